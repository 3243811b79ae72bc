"""`lomar pretrain`: outputs, exact resume, preemption, bad data, non-finite loss, bad config, DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lomar.checkpoint import safe_load
from lomar.cli import main

TINY = ["--model", "vit_tiny_patch8", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
        "--img-size", "32", "--window-size", "3", "--windows", "2", "--batch-size", "2",
        "--workers", "0", "--device", "cpu", "--epochs", "3", "--warmup-epochs", "1", "--lr", "1e-3",
        "--figure-images", "2", "--log-every", "1"]


def _images(root: Path, count: int, bad: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    for i in range(bad):
        (root / f"broken{i:02d}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _images(tmp_path_factory.mktemp("data") / "imgs", 8)


def _run(*args) -> int:
    return main(["pretrain", *TINY, *map(str, args)])


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_everything(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run("--data", data, "--out", out, "--max-steps", "3") == 0
    for name in ("last.pt", "metrics.jsonl", "config.yaml", "reconstruction.png", "encoder.safetensors",
                 "config.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("checkpoint-*.pt")) and list((out / "tb").iterdir())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert set(records[0]) == {"step", "epoch", "loss", "lr", "img_s"}
    ckpt = safe_load(out / "last.pt")
    assert ckpt["step"] == 3 and ckpt["config"]["embed_dim"] == 32 and "optimizer" in ckpt
    assert "done at step 3" in capsys.readouterr().out


def test_exact_resume(data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run("--data", data, "--out", one, "--max-steps", "4") == 0
    assert _run("--data", data, "--out", two, "--max-steps", "2") == 0
    assert _run("--data", data, "--out", two, "--max-steps", "4", "--resume", "auto") == 0
    a, b = safe_load(one / "last.pt")["model"], safe_load(two / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(one) == _losses(two) and len(_losses(one)) == 4


def test_resume_across_epoch_boundary_with_accumulation(data, tmp_path):
    # 8 images, batch 2, accum 2: 2 optimizer steps per epoch; stop at 3 = mid-epoch 1.
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--data", data, "--accum-steps", "2")
    assert _run(*args, "--out", one, "--max-steps", "5") == 0
    assert _run(*args, "--out", two, "--max-steps", "3") == 0
    assert _run(*args, "--out", two, "--max-steps", "5", "--resume", "auto") == 0
    assert _losses(one) == _losses(two)
    assert torch.equal(safe_load(one / "last.pt")["model"]["head.weight"],
                       safe_load(two / "last.pt")["model"]["head.weight"])


def test_bad_images_are_skipped_and_counted(tmp_path, capsys):
    data = _images(tmp_path / "imgs", 19, bad=1)
    assert _run("--data", data, "--out", tmp_path / "run", "--max-steps", "10") == 0  # one epoch
    assert "1 unreadable image(s) skipped, e.g." in capsys.readouterr().out


def test_too_many_bad_images_stop_with_clear_error(tmp_path, capsys):
    data = _images(tmp_path / "imgs", 10, bad=10)
    assert _run("--data", data, "--out", tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert "could not be read" in err and "fix or remove them" in err


def test_non_finite_loss_keeps_last_good_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run("--data", data, "--out", out, "--max-steps", "2") == 0
    good = safe_load(out / "last.pt")
    assert _run("--data", data, "--out", out, "--resume", "auto", "--lr", "1e30") == 1
    err = capsys.readouterr().err
    assert "at step" in err and "last good checkpoint" in err
    kept = safe_load(out / "last.pt")
    assert kept["step"] == 2 and torch.equal(kept["model"]["head.weight"], good["model"]["head.weight"])


@pytest.mark.parametrize("args, words", [
    (["--model", "vit_giant_patch16"], "unknown model"),
    (["--window-size", "5"], "does not fit"),
    (["--windows", "5"], "window positions"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--data", "/no/such/folder"], "does not exist"),
    (["--mask-ratio", "0.01"], "masks 0 of the 9"),
    (["--method", "mae", "--pos", "rpe"], "needs --pos abs"),
])
def test_bad_configuration_exits_2_with_one_line(args, words, tmp_path, capsys):
    assert _run("--out", tmp_path / "run", *args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing was started


def test_out_holding_another_run(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run("--data", data, "--out", out, "--max-steps", "1") == 0
    assert _run("--data", data, "--out", out, "--max-steps", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _run("--data", data, "--out", out, "--max-steps", "1", "--overwrite") == 0


def test_yaml_config_and_print(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("windows: 3\nblr: 0.001\n")
    assert main(["pretrain", "--config", str(cfg), "--blr", "0.002", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "windows: 3" in text and "blr: 0.002" in text
    cfg.write_text("window: 3\n")
    assert main(["pretrain", "--config", str(cfg)]) == 2
    assert "unknown setting(s) window" in capsys.readouterr().err


def test_mae_method_runs(data, tmp_path):
    out = tmp_path / "mae"
    assert _run("--data", data, "--out", out, "--max-steps", "2", "--method", "mae", "--pos", "abs",
                "--decoder-embed-dim", "16", "--decoder-depth", "1", "--decoder-num-heads", "2") == 0
    assert (out / "reconstruction.png").is_file()


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def test_sigterm_checkpoints_and_exits_0(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lomar", "pretrain", *TINY, "--data", str(data), "--out", str(out),
           "--epochs", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert "Resume with: lomar pretrain" in output
    ckpt = safe_load(out / "last.pt")
    assert ckpt["step"] >= 1 and ckpt["step"] == len(_losses(out))


def test_torchrun_two_processes_equal_single_process(data, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ["pretrain", *TINY, "--data", str(data), "--max-steps", "3", "--epochs", "1"]
    # 8 images: one epoch is 2 steps of a global batch of 4, so 3 steps cross into epoch 1.
    common[common.index("--epochs") + 1] = "2"
    assert main([*common, "--out", str(single), "--batch-size", "4"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "lomar", *common, "--out", str(multi), "--batch-size", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    a, b = safe_load(single / "last.pt"), safe_load(multi / "last.pt")
    assert a["step"] == b["step"] == 3
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(_losses(single), _losses(multi), rtol=1e-5)
