"""A toy Task and its config for tests of the shared run lifecycle (lomar.train.lifecycle): linear regression on
32 fixed points, run in one process or in two forked ones."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from helpers import free_port
from lomar.data.samplers import EpochSampler
from lomar.train.lifecycle import run
from lomar.train.task import Task


@dataclasses.dataclass
class ToyConfig:
    COMMAND = "toy"
    out: str = ""
    resume: str | None = None
    overwrite: bool = False
    device: str = "cpu"
    seed: int = 0
    threads: int | None = 1
    epochs: int = 3
    max_steps: int | None = None
    schedule_steps: int | None = None
    warmup_epochs: float = 1
    blr: float = 0.5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 4
    accum_steps: int = 2
    precision: str = "fp32"
    log_every: int = 1
    time_limit: int | None = None


class ToyTask(Task):
    """Linear regression on ``points`` (32) fixed points; "score" rises as the loss falls."""

    name, best_metric, points = "toy", "score", 32

    def __init__(self, config: ToyConfig, info, device):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(self.points, 3, generator=gen)
        self.data = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5]))
        self.model = torch.nn.Linear(3, 1)
        sampler = EpochSampler(len(self.data), config.seed, info.rank, info.world_size, keys=False)
        self.train_loader = DataLoader(self.data, config.batch_size, sampler=sampler, drop_last=True)
        self.finished = False

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).squeeze(1), y)

    @torch.no_grad()
    def evaluate(self):
        x, y = self.data.tensors
        return {"score": -float(torch.nn.functional.mse_loss(self.model(x).squeeze(1), y))}

    def finish(self, out):
        (out / "finished").write_text("yes")


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _ranked_run(rank: int, port: int, out: str, task: type, settings: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    try:
        code = run(ToyConfig(out=out, accum_steps=1, **settings), task)
    except Exception as exc:  # noqa: BLE001 - recorded for the test, which reads what each rank raised
        (Path(out) / f"rank{rank}.error").write_text(f"{type(exc).__name__}: {exc}")
        code = 1
    os._exit(code)


def run_two_ranks(task: type, out, hang: str, timeout: float = 120, errors: bool = False, code: int = 0,
                  **settings) -> list[str]:
    """A :class:`ToyConfig` run of ``task`` in two forked processes; fails with ``hang`` (what went out of step)
    when they have not both ended after ``timeout`` s, killing them: a collective that one rank never joins waits
    forever. ``errors``: the ranks may raise; each one's "Type: message" (or "") is returned; otherwise an error, or
    an exit code other than ``code``, fails the test."""
    context = mp.start_processes(_ranked_run, args=(free_port(), str(out), task, settings), nprocs=2, join=False,
                                 start_method="fork")  # no fresh imports of torch and lomar (spawn: 3-4 s)
    deadline = time.monotonic() + timeout
    while not all(process.exitcode is not None for process in context.processes):
        time.sleep(0.2)
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(hang)
    raised = [(Path(out) / f"rank{rank}.error").read_text() if (Path(out) / f"rank{rank}.error").exists() else ""
              for rank in range(2)]
    if not errors and (any(raised) or any(process.exitcode != code for process in context.processes)):
        pytest.fail(f"the ranks raised {raised}, exit codes {[process.exitcode for process in context.processes]}")
    return raised
