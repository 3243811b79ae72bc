"""A `lomar pretrain` run stopped or disturbed: SIGTERM, SIGUSR1 and Ctrl-C checkpoints, a reader that leaves early,
two torchrun processes against one, a full disk, a killed loader worker, and a figure that fails."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, assert_same_weights_but_key_bias, fill_disk, pretrain
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.eval.features import load_pretrained_encoder
from lomar.eval.knn import KnnMonitor

BIN = Path(sys.executable).parent


def _env() -> dict:
    # One thread per process: on a small shared CPU, more only oversubscribes it.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _training_in_background(out, image_dir) -> tuple[subprocess.Popen, Path]:
    """A long tiny pretraining into ``out`` in a process group of its own, returned once its log holds two steps:
    (the process, its metrics.jsonl)."""
    cmd = [sys.executable, "-m", "lomar", "pretrain", *TINY, "--data", str(image_dir), "--out", str(out),
           "--epochs", "1000", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600  # imports alone take minutes when the shared machine is busy
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    return proc, metrics


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_0(tmp_path, image_dir):
    out = tmp_path / "run"
    proc, metrics = _training_in_background(out, image_dir)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: the loader worker gets it too
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "SIGTERM" in output and "--resume auto" in output
    step = safe_load(out / "last.pt")["step"]
    assert step >= 2 and step == len(metrics.read_text().splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("both", [False, True], ids=["stdout", "stdout-and-stderr"])
def test_a_reader_that_leaves_early_does_not_stop_the_run(tmp_path, image_dir, both):
    """`lomar pretrain | head -1` (and `2>&1 | head -1`): the pipe breaks at the next line; the run goes on to
    its checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lomar", "pretrain", *TINY, "--data", str(image_dir), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if both else subprocess.PIPE,
                            text=True, env=_env())
    first = proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=600)
    assert first.startswith("lomar pretrain: ") and proc.returncode == 0, err
    assert both or ("Traceback" not in err and "BrokenPipe" not in err)
    assert safe_load(out / "last.pt")["step"] == len((out / "metrics.jsonl").read_text().splitlines()) == 8


def test_sigusr1_in_process_checkpoints_and_resumes(tmp_path, image_dir, capsys, monkeypatch, no_run_figures):
    from lomar.train.monitor import Monitor

    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGUSR1)
    real_step = Monitor.step

    def step_then_signal(self, step, *args):  # the signal arrives while step 2 is being logged
        real_step(self, step, *args)
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(Monitor, "step", step_then_signal)
    assert pretrain("--data", str(image_dir), "--out", str(out), "--epochs", "50") == 0
    monkeypatch.undo()
    assert "stopped by SIGUSR1 at step 2" in capsys.readouterr().out
    assert safe_load(out / "last.pt")["step"] == 2
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers given back
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "3", "--resume", "auto") == 0
    assert safe_load(out / "last.pt")["step"] == 3


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_global_batch(tmp_path, image_dir):
    data = shutil.copytree(image_dir, tmp_path / "data")
    (data / "._img000.png").write_bytes(b"")  # a macOS metadata file beside a photo: listing --data warns of it
    common = [*TINY, "--data", str(data), "--max-steps", "3", "--warmup-epochs", "0"]
    ddp_out, single_out, knn, logs = tmp_path / "ddp", tmp_path / "single", tmp_path / "knn", tmp_path / "logs"
    # k-NN at the end (epoch 2 of 2 steps is not reached): batches of 128, 140 train and 133 val images, so rank 1
    # extracts the last batch of each, the unreadable val image among them; the classes' brightness ranges overlap,
    # so that the score is neither a class's share nor 1
    for split, label, count in (("train", "a", 70), ("train", "b", 70), ("val", "a", 70), ("val", "b", 62)):
        (knn / split / label).mkdir(parents=True)
        for i in range(count):
            draw = np.random.RandomState(i + 1000 * (split == "val"))
            pixels = draw.randint(0, 100) + 60 * (label == "b") + draw.randint(0, 96, (8, 8, 3))
            Image.fromarray(pixels.astype(np.uint8)).save(knn / split / label / f"img{i:03d}.png")
    (knn / "val" / "b" / "zz-broken.png").write_bytes(b"")
    shutil.copy(knn / "train" / "a" / "img000.png", knn / "train" / "stray.png")  # outside the classes: a warning
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--tee", "3", "--log-dir", str(logs),
           "-m", "lomar", "pretrain", *common, "--out", str(ddp_out), "--knn-every", "2", "--knn-data", str(knn)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # every process extracted its share, and the score is the one a single process gives on the same weights
    errs = {int(path.parent.name): path.read_text() for path in logs.glob("*/attempt_0/*/stderr.log")}
    assert ["zz-broken.png" in errs[rank] for rank in (0, 1)] == [False, True], errs
    # what listing the folders found is said by the machine's first process alone, not by each
    assert ["outside the class folders" in errs[rank] for rank in (0, 1)] == [True, False], errs
    assert [errs[rank].count("macOS metadata file") for rank in (0, 1)] == [1, 0], errs  # so is what --data holds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process ran
    try:
        one = KnnMonitor(knn, img_size=32, workers=0)(load_pretrained_encoder(ddp_out / "last.pt"))
    finally:
        torch.set_num_threads(threads)
    assert [json.loads(line)["knn_top1"] for line in (ddp_out / "knn.jsonl").read_text().splitlines()] == [one]
    assert main(["pretrain", *common, "--batch-size", "8", "--out", str(single_out)]) == 0
    ddp, single = safe_load(ddp_out / "last.pt"), safe_load(single_out / "last.pt")
    assert ddp["step"] == single["step"] == 3
    assert_same_weights_but_key_bias(ddp["model"], single["model"])
    # Only rank 0 writes: one metrics line per step.
    assert len((ddp_out / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, image_dir,
                                                                            monkeypatch):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "2") == 0
    before = (out / "last.pt").read_bytes()

    fill_disk(monkeypatch)  # torch.save's zip writer meets ENOSPC part-way, as on a real disk
    capsys.readouterr()
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "3", "--resume", "auto") == 1
    err = capsys.readouterr().err
    assert "no space left" in err and err.count("\n") == 1 and "Traceback" not in err
    monkeypatch.undo()
    assert (out / "last.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_ctrl_c_checkpoints_exits_130_and_a_second_run_is_refused_meanwhile(tmp_path, image_dir, capsys, caplog):
    out = tmp_path / "run"
    proc, metrics = _training_in_background(out, image_dir)
    capsys.readouterr()
    caplog.clear()
    # this process: no second start-up to wait for. A logged warning or a Python warning, which a command prints on
    # its stderr, goes to pytest's handlers here: the one line is the whole of what the refusal says only without them
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        code = main(["pretrain", "--out", str(out), "--resume", "auto"])
    second = capsys.readouterr().err
    assert code == 2 and "in use by another run" in second, second
    assert second.count("\n") == 1
    # a command's default filters hide these (a ResourceWarning here may be another test's file, collected now)
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    shown = [str(w.message) for w in warned if not issubclass(w.category, hidden)]
    assert not caplog.records and not shown, (caplog.records, shown)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "stopped by SIGINT" in output and "Traceback" not in output
    step = safe_load(out / "last.pt")["step"]
    assert step >= 2 and step == len(metrics.read_text().splitlines())


@pytest.mark.slow  # starts a loader worker process
def test_a_loader_worker_the_system_killed_is_one_line_and_exit_1(tmp_path, capsys, image_dir, monkeypatch):
    """As the kernel's out-of-memory killer stops a worker: one line and exit 1, not torch's RuntimeError with its
    traceback."""
    from lomar.train import pretrain as pretrain_module

    monkeypatch.setattr(pretrain_module, "ignore_stop_signals", lambda worker_id: os.kill(os.getpid(), signal.SIGKILL))
    code = main(["pretrain", *TINY, "--data", str(image_dir), "--out", str(tmp_path / "run"), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 1, err
    # torch says "is killed by signal: Killed." or, when its watchdog sees it first, "exited unexpectedly"
    assert re.fullmatch(r"lomar pretrain: error: DataLoader worker \(pid(\(s\))? \d+\) (is killed by signal: Killed\.|"
                        r"exited unexpectedly) \(the "
                        r"system kills a worker that runs out of memory: lower --workers or --batch-size\); resume "
                        r"with --resume auto \(from the last checkpoint, if one was written\)\n", err), err


def test_a_full_disk_at_the_first_figure_stops_the_run_in_one_line(tmp_path, capsys, image_dir, monkeypatch):
    out = tmp_path / "run"
    fill_disk(monkeypatch, room=2048)  # the settings fit, the step-0 reconstruction figure does not
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "2") == 1
    err = capsys.readouterr().err
    assert f"writing {out / 'reconstruction-000000.png'}: no space left on the device" in err, err
    assert err.count("\n") == 1 and not (out / "metrics.jsonl").read_text()  # not trained on towards a failed save


def test_a_figure_that_fails_on_a_file_outside_the_run_folder_is_a_note_not_a_stop(tmp_path, capsys, image_dir,
                                                                                     monkeypatch):
    # a font matplotlib cannot read says nothing of the run folder, whose checkpoints are still written
    import errno

    from matplotlib.backends import backend_agg

    font = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"

    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", font)

    monkeypatch.setattr(backend_agg, "get_font", unreadable)
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "2") == 0
    err = capsys.readouterr().err
    said = f"lomar pretrain: could not draw the reconstruction figure: [Errno 13] Permission denied: '{font}'"
    assert err.count(said) == 1, err  # the figures of steps 0 and 2 failed alike, and the end tried step 2's again
    assert safe_load(out / "last.pt")["step"] == 2
