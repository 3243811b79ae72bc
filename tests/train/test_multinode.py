"""Two "nodes" (two torchrun launches, one process each, static rendezvous on 127.0.0.1) with gloo
give the same run as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY, assert_same_weights_but_key_bias, free_port
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_two_node_launch_matches_one_process_with_the_global_batch(tmp_path, image_dir):
    common = [*TINY, "--data", str(image_dir), "--max-steps", "3", "--warmup-epochs", "0"]
    multi, single = tmp_path / "two-nodes", tmp_path / "single"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    nodes = [subprocess.Popen(
        [str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "lomar", "pretrain", *common,
         "--out", str(multi)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for rank in (0, 1)]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, log) in enumerate(zip(nodes, logs)):
        assert node.returncode == 0, f"node {rank}:\n{log[-3000:]}"
    assert main(["pretrain", *common, "--batch-size", "8", "--out", str(single)]) == 0
    two, one = safe_load(multi / "last.pt"), safe_load(single / "last.pt")
    assert two["step"] == one["step"] == 3
    assert_same_weights_but_key_bias(two["model"], one["model"])
    # One checkpoint and one log, written by the node-0 process only.
    assert sorted(p.name for p in multi.glob("checkpoint-*.pt")) == ["checkpoint-000003.pt"]
    assert len((multi / "metrics.jsonl").read_text().splitlines()) == 3
    assert "done at step 3" in logs[0] and "done at step" not in logs[1]
