"""`lomar pretrain` as a command: configuration errors, YAML, preemption, torchrun."""

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
import yaml
from PIL import Image

from helpers import TINY, fill_disk, losses, pretrain
from lomar.checkpoints.io import safe_load
from lomar.cli import app
from lomar.cli.app import main
from lomar.eval.features import load_pretrained_encoder
from lomar.eval.knn import KnnMonitor

BIN = Path(sys.executable).parent


def _env() -> dict:
    # One thread per process: on a small shared CPU, more only oversubscribes it.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("flags, message", [
    (["--model", "vit_gigantic_patch16"], "invalid choice: 'vit_gigantic_patch16' (choose from 'vit_mini_patch8'"),
    (["--window-size", "5"], "does not fit"),
    (["--windows", "5"], "window positions"),
    # a 2x2 blockwise mask is empty in about 1 draw of 75, which stopped the run at batch size 1
    (["--method", "beit", "--window-size", "2", "--windows", "2"], "--window-size 2 is too small for block"),
    (["--method", "beit", "--windows", "0", "--img-size", "16"], "2x2 patch grid (--windows 0) is too small"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--data", "/no/such/folder"], "does not exist"),
    (["--mask-ratio", "0.05"], "mask ratio"),
    (["--method", "mae", "--pos", "rpe"], "--pos abs"),
    (["--resume", "/no/such.pt"], "does not exist"),
    (["--resume", "/dev/null"], "--resume /dev/null is not a regular file (a device or pipe)"),
    (["--decode", "windows", "--method", "mae", "--pos", "abs", "--windows", "0"], "this run is --method mae with "
                                                                               "--windows 0, which reads the whole "
                                                                               "crop; pass --windows N (local "
                                                                               "windows), or use --decode draft"),
    # BEiT's built-in tokenizer of 8 px patches reads a view resized from 16 px ones: blank pixels around the
    # windows would change its targets (tests/models/test_methods_windows.py)
    (["--decode", "windows", "--method", "beit", "--color-jitter", "0", "--patch-size", "16", "--img-size", "64"],
     "--method beit labels its targets with the built-in k-means tokenizer, whose 8 px patches read the crop "
     "resized for the model's 16 px patches"),
    (["--decode", "gpu"], "not --device cpu"),
    (["--cpu-decode-share", "0.3"], "this run is --decode full; drop it, or use --decode gpu"),
    (["--cpu-decode-share", "1.5"], "--cpu-decode-share must be"),
    (["--gpu-decoder", "nvimgcodec"], "this run is --decode full; drop it, or use --decode gpu"),
    (["--decode", "draft", "--data", "/no/shards-*.tar"], "not tar shards"),
])
def test_bad_configuration_is_one_line_and_exit_2(tmp_path, capsys, image_dir, flags, message):
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "--out", str(out)]
    if "--data" not in flags:
        args += ["--data", str(image_dir)]
    code = main(args + flags)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("lomar pretrain: error:")
    assert not out.exists()  # nothing was done


def test_beit_decode_windows_runs_with_the_tokenizer_its_refusal_asks_for(tmp_path, capsys, image_dir):
    """--decode windows refuses BEiT's built-in 8 px tokenizer on 32 px patches, naming `lomar tokenizer fit --patch
    32`: that command runs (a fixed 112 px view refused 32) and so does the run with its file; a file that is no
    tokenizer is named as such."""
    args = [*TINY, "--data", str(image_dir), "--method", "beit", "--patch-size", "32", "--img-size", "128",
            "--color-jitter", "0", "--decode", "windows", "--max-steps", "1"]
    assert main(["pretrain", *args, "--out", str(tmp_path / "r0")]) == 2
    assert "`lomar tokenizer fit --patch 32`" in capsys.readouterr().err
    tokenizer = tmp_path / "tok32.safetensors"
    assert main(["tokenizer", "fit", "--patch", "32", "--data", str(image_dir), "--vocab", "4", "--max-images", "4",
                 "--iters", "1", "--out", str(tokenizer)]) == 0
    assert main(["pretrain", *args, "--out", str(tmp_path / "run"), "--tokenizer", str(tokenizer)]) == 0
    assert len(losses(tmp_path / "run")) == 1
    (tmp_path / "tok.txt").write_text("a tokenizer\n")
    capsys.readouterr()
    assert main(["pretrain", *args, "--out", str(tmp_path / "r1"), "--tokenizer", str(tmp_path / "tok.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lomar pretrain: error: --tokenizer: {tmp_path / 'tok.txt'} is a text file, not a "
                          f"tokenizer file; a tokenizer file is") and err.count("\n") == 1


@pytest.mark.parametrize("local_rank, stopped, code, shown", [("0", False, 2, 1), ("1", True, 143, 0),
                                                              ("1", False, 2, 1)])
def test_under_torchrun_the_first_process_of_a_machine_alone_prints_a_bad_configuration(
        tmp_path, capsys, image_dir, monkeypatch, local_rank, stopped, code, shown):
    # every process printed the same error (and note): torchrun --nproc-per-node 8 showed each line 8 times
    import signal

    from lomar import errors

    def wait(seconds):  # for the first process to fail: torchrun then stops the others (stopped), or it did not
        assert seconds == errors.FIRST_PROCESS_WAIT
        if stopped:
            raise app.Terminated(signal.SIGTERM)

    monkeypatch.setattr(time, "sleep", wait)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["pretrain", *TINY, "--data", str(image_dir), "--out", str(tmp_path / "run"), "--windows", "0",
            "--window-size", "5"]
    assert main([*args, "--batch-size", "0"]) == code  # every process stops
    assert capsys.readouterr().err == "lomar pretrain: error: --batch-size must be positive, got 0\n" * shown
    assert main([*args, "--print-config"]) == 0
    assert capsys.readouterr().err.count("note: --window-size 5 is unused") == (local_rank == "0")
    (tmp_path / "empty").mkdir()  # found once the run starts, not by the settings: one process, taken for rank N
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(errors, "first_on_machine", lambda: local_rank == "0")
    assert main([*args, "--data", str(tmp_path / "empty")]) == code
    assert capsys.readouterr().err.count(f"lomar pretrain: error: no images found in {tmp_path / 'empty'}") == shown


def test_a_single_process_prints_its_errors_whatever_local_rank_a_job_left_set(monkeypatch):
    # LOCAL_RANK=1 alone (no WORLD_SIZE) made a single process wait 30 s on any error, then hide its notes
    from lomar.errors import first_on_machine

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert first_on_machine()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert first_on_machine()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not first_on_machine()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert first_on_machine()


def test_the_hardware_decoder_without_its_package_is_one_line(tmp_path, capsys, image_dir, monkeypatch):
    from lomar.data import gpu_jpeg

    monkeypatch.setattr(gpu_jpeg.importlib.util, "find_spec", lambda name: None)
    out = tmp_path / "run"
    code = main(["pretrain", *TINY, "--data", str(image_dir), "--out", str(out), "--device", "auto",
                 "--decode", "gpu", "--gpu-decoder", "nvimgcodec"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg" in err, err
    assert err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("case", ["device", "empty folder", "too few images", "one image", "too many batches a step",
                                  "decoder heads", "corrupt resume", "gpu decode without a gpu"])
def test_set_up_failures_are_one_line_and_exit_2(tmp_path, capsys, image_dir, case):
    if case == "gpu decode without a gpu" and torch.cuda.is_available():
        pytest.skip("this machine has the GPU the case is about")
    out, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    flags, message = {
        "device": (["--device", "tpu"], "--device tpu"),
        "empty folder": (["--data", str(empty)], "no images found"),
        "too few images": (["--batch-size", "32"], "cannot fill one step"),
        "one image": (["--data", str(empty), "--batch-size", "2"], ": 1 image cannot fill one step"),  # not 1 images
        "too many batches a step": (["--batch-size", "1", "--accum-steps", "1000"],
                                    "lower --batch-size or --accum-steps"),
        "decoder heads": (["--method", "mae", "--pos", "abs", "--mask-ratio", "0.75", "--decoder-embed-dim", "16",
                           "--decoder-num-heads", "5"],
                          "--decoder-embed-dim 16 is not divisible by --decoder-num-heads 5"),
        "corrupt resume": (["--resume", str(out / "last.pt")], "cannot read checkpoint"),
        "gpu decode without a gpu": (["--device", "auto", "--decode", "gpu"], "needs a CUDA device"),
    }[case]
    if case == "one image":
        shutil.copy(next(image_dir.iterdir()), empty)
    if case == "corrupt resume":
        out.mkdir()
        (out / "last.pt").write_bytes(b"not a checkpoint")
    data = [] if "--data" in flags else ["--data", str(image_dir)]
    code = main(["pretrain", *TINY, *data, "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("lomar pretrain: error:")


def test_the_start_line_counts_one_image_and_one_window_in_the_singular(tmp_path, capsys, image_dir):
    data = tmp_path / "one"
    data.mkdir()
    shutil.copy(next(image_dir.iterdir()), data)
    i = TINY.index("--windows")
    assert main(["pretrain", *TINY[:i], *TINY[i + 2:], "--windows", "1", "--batch-size", "1", "--max-steps", "1",
                 "--data", str(data), "--out", str(tmp_path / "run")]) == 0
    assert f"; 1 image in {data}; " in (out := capsys.readouterr().out) and ", 1 window of 3x3 patches, " in out, out


def test_shards_without_a_readable_image_blame_the_data_not_the_batch(tmp_path, capsys):
    shard = tmp_path / "random.tar"
    shard.write_bytes(bytes(range(256)) * 12)
    code = main(["pretrain", *TINY, "--data", str(shard), "--out", str(tmp_path / "run")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last == (f"lomar pretrain: error: --data {shard} holds no image that could be read (see the "
                                  f"skipped files above); fix the data")


def test_config_yaml_records_neither_overwrite_nor_resume(tmp_path, capsys, image_dir):
    """config.yaml recorded the invocation's --overwrite (and --resume): given back as --config to start another
    run, it replaced the run held in that --out without a word."""
    victim, first = tmp_path / "victim", tmp_path / "first"
    assert main(["pretrain", *TINY, "--data", str(image_dir), "--out", str(victim), "--max-steps", "1"]) == 0
    assert main(["pretrain", *TINY, "--data", str(image_dir), "--out", str(first), "--max-steps", "1",
                 "--overwrite"]) == 0
    recorded = yaml.safe_load((first / "config.yaml").read_text())
    assert recorded["overwrite"] is False and recorded["resume"] is None and recorded["max_steps"] == 1
    capsys.readouterr()
    assert main(["pretrain", "--config", str(first / "config.yaml"), "--out", str(victim)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(first), "--resume", "auto", "--overwrite", "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)  # --print-config shows the invocation's
    assert shown["resume"] == "auto" and shown["overwrite"] is True


def test_out_holding_another_run_needs_resume_or_overwrite(tmp_path, capsys, image_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("method: lomar\n")
    assert main(["pretrain", *TINY, "--data", str(image_dir), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["pretrain", *TINY, "--data", str(image_dir), "--out", str(out), "--overwrite",
                 "--max-steps", "1"]) == 0
    assert safe_load(out / "last.pt")["step"] == 1


def test_yaml_config_flags_override_and_print_config(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"window-size": 5, "windows": 3, "img_size": 128, "blr": 1e-3,
                                      "out": str(tmp_path / "x")}))
    assert main(["pretrain", "--config", str(config), "--windows", "2", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["window_size"] == 5 and resolved["img_size"] == 128 and resolved["blr"] == 1e-3
    assert resolved["windows"] == 2  # the flag wins over the file
    assert resolved["mask_ratio"] == 0.8 and resolved["pos"] == "rpe"
    assert not (tmp_path / "x").exists()


def test_yaml_unknown_key_is_a_usage_error(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("window_size: 7\nwindow_szie: 5\n")
    assert main(["pretrain", "--config", str(config)]) == 2
    assert "window_szie" in capsys.readouterr().err


def test_recipe_defaults_with_data(tmp_path, capsys, image_dir):
    assert main(["pretrain", "--data", str(image_dir), "--out", str(tmp_path / "r"), "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["blr"] == 1.5e-4 and resolved["weight_decay"] == 0.05 and resolved["min_lr"] == 0.0
    assert (resolved["window_size"], resolved["windows"], resolved["mask_ratio"]) == (7, 4, 0.8)
    assert resolved["model"] == "vit_base_patch16" and resolved["img_size"] == 224


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_0(tmp_path, image_dir):
    out = tmp_path / "run"
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


def test_sigusr1_in_process_checkpoints_and_resumes(tmp_path, image_dir, capsys, monkeypatch):
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
    # what listing the folders found is said by the machine's first process alone (it was said by each)
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
    dim = 32
    for key, value in single["model"].items():
        other = ddp["model"][key]
        if key.endswith("attn.qkv.bias"):
            # The key bias has an exactly zero gradient (softmax ignores a constant added to every
            # logit of a row); Adam turns its rounding noise into lr-sized random steps, which
            # differ with the reduction order. Query and value biases must match.
            value, other = torch.cat([value[:dim], value[2 * dim:]]), torch.cat([other[:dim], other[2 * dim:]])
        torch.testing.assert_close(other, value, rtol=0, atol=2e-6, msg=key)
    # Only rank 0 writes: one metrics line per step.
    assert len((ddp_out / "metrics.jsonl").read_text().splitlines()) == 3


def test_bare_resume_means_auto(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--resume", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["resume"] == "auto"


# ---- run-folder safety ---------------------------------------------------------------

def _bad_out(tmp_path, kind: str) -> str:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    return str(afile if kind == "file" else afile / "sub")


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--lr", "0"], "--lr must be positive"),
    (["--blr", "nan"], "--blr must be a finite number"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--threads", "0"], "--threads must be positive"),
    (["--img-size", "100000"], "--img-size must be at most 8192"),
    (["--resume", "auto", "--out", None], "--resume auto needs --out"),
    (["--out", "file"], "is a file"),
    (["--out", "under a file"], "which is a file"),
    (["--out", ""], "--out must be non-empty, got ''"),  # Path("") is the working folder
    (["--out", "inside the data"], "is inside --data"),  # the run's figures would become training images
])
def test_bad_invocations_are_one_line_and_create_no_folder(tmp_path, capsys, image_dir, flags, message):
    out = tmp_path / "run"
    flags = list(flags)
    if "--out" in flags:
        i = flags.index("--out")
        if flags[i + 1] is None:
            del flags[i:i + 2]
        elif flags[i + 1] == "inside the data":
            flags[i + 1] = str(image_dir / "run")
        elif flags[i + 1]:
            flags[i + 1] = _bad_out(tmp_path, flags[i + 1])
    else:
        flags += ["--out", str(out)]
    before = set(tmp_path.iterdir())
    code = main(["pretrain", *TINY, "--data", str(image_dir), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert set(tmp_path.iterdir()) == before and not out.exists() and not Path("runs").exists()


def test_a_locked_run_folder_refuses_a_second_run(tmp_path, capsys, image_dir):
    from lomar.train.run_lock import RunLock

    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "1") == 0
    capsys.readouterr()
    with RunLock(out):  # another run holds the folder
        for extra in (["--resume", "auto", "--max-steps", "2"], ["--overwrite"], []):  # [] not: "pass --resume"
            assert pretrain("--data", str(image_dir), "--out", str(out), *extra) == 2
            err = capsys.readouterr().err
            assert "is in use by another run" in err and err.count("\n") == 1
    assert safe_load(out / "last.pt")["step"] == 1


def test_a_resume_that_cuts_the_epochs_below_the_warm_up_says_what_it_can_do(tmp_path, capsys, image_dir):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--epochs", "4", "--warmup-epochs", "2",
                    "--max-steps", "1") == 0
    capsys.readouterr()
    assert main(["pretrain", "--out", str(out), "--resume", "auto", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "a resumed run keeps its warm-up: pass --epochs 2 or more, and --max-steps N to stop sooner" in err


def test_resume_never_rewinds_a_folder_with_newer_state(tmp_path, capsys, image_dir):
    out, branch = tmp_path / "run", tmp_path / "branch"
    # 16 images, batch 4: 4 steps per epoch; checkpoints at steps 4 and 8
    assert pretrain("--data", str(image_dir), "--out", str(out), "--save-every", "1", "--keep-last", "5") == 0
    old = out / "checkpoint-000004.pt"
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(old), "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "would rewind" in err and "step 8" in err and err.count("\n") == 1
    assert safe_load(out / "last.pt")["step"] == 8 and (out / "metrics.jsonl").read_text() == metrics
    assert old.exists() and (out / "checkpoint-000008.pt").exists()
    # --out elsewhere branches off: the new run is written there, the old one untouched
    assert main(["pretrain", "--resume", str(old), "--max-steps", "6", "--out", str(branch)]) == 0
    assert safe_load(branch / "last.pt")["step"] == 6 and len(losses(branch)) == 2
    assert safe_load(out / "last.pt")["step"] == 8
    # --overwrite rewinds on purpose, and drops the history past the checkpoint
    assert main(["pretrain", "--resume", str(old), "--max-steps", "6", "--overwrite"]) == 0
    assert safe_load(out / "last.pt")["step"] == 6 and len(losses(out)) == 6
    assert not (out / "checkpoint-000008.pt").exists()


def test_resume_auto_without_last_pt_uses_the_newest_intact_checkpoint(tmp_path, capsys, image_dir):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--epochs", "3", "--save-every", "1",
                    "--keep-last", "5") == 0
    (out / "last.pt").unlink()  # what a full disk can leave
    (out / "checkpoint-000012.pt").write_bytes(b"cut short")
    stale = out / ".checkpoint-000012.pt.tmp-999999"
    stale.write_bytes(b"a writer killed mid-write")
    capsys.readouterr()
    assert main(["pretrain", "--out", str(out), "--resume", "auto", "--max-steps", "10"]) == 0
    printed, noted = capsys.readouterr()
    assert "last.pt is missing" in noted and "checkpoint-000012.pt cannot be read" in noted  # notes, on stderr
    assert "resumed from" in printed and "checkpoint-000008.pt at step 8" in printed
    assert "note: removed 1 stale temporary file" in noted and not stale.exists()
    assert safe_load(out / "last.pt")["step"] == 10
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 11))  # no duplicate steps


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
    cmd = [sys.executable, "-m", "lomar", "pretrain", *TINY, "--data", str(image_dir), "--out", str(out),
           "--epochs", "1000", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
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


def _without(flags: list[str], *names: str) -> list[str]:
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in names:
            skip = True
        else:
            out.append(flag)
    return out


def test_max_steps_without_epochs_warms_up_to_the_peak_within_the_run(tmp_path, capsys, image_dir):
    """The recipe's 400 epochs / 40 of warm-up, laid over --max-steps: the lr reaches blr x batch / 256."""
    flags = _without(TINY, "--epochs", "--warmup-epochs", "--lr")
    out = tmp_path / "run"
    assert main(["pretrain", *flags, "--data", str(image_dir), "--out", str(out), "--max-steps", "10"]) == 0
    assert "warning" not in capsys.readouterr().err
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = 1.5e-4 * 4 / 256
    assert len(lrs) == 10 and max(lrs) == pytest.approx(peak) and lrs[-1] < peak / 10
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["schedule_steps"] == 10 and saved["epochs"] == 400


def test_max_steps_inside_an_explicit_warmup_warns_up_front(tmp_path, capsys, image_dir):
    flags = _without(TINY, "--warmup-epochs", "--lr")
    out = tmp_path / "run"
    assert main(["pretrain", *flags, "--data", str(image_dir), "--out", str(out), "--max-steps", "2",
                 "--warmup-epochs", "2"]) == 0
    printed = capsys.readouterr()  # a warning goes to stderr, as every warning and note does
    assert "warning: this run stops at step 2, inside its 8-step warm-up" in printed.err
    assert "drop --epochs" in printed.err
    assert "warning" not in printed.out


def test_a_warm_up_that_schedule_steps_set_is_not_blamed_on_epochs(tmp_path, capsys, image_dir):
    """--schedule-steps 40 (not --epochs) lays this warm-up over 10 steps: the warning told the run to drop --epochs,
    which changes nothing; it names --schedule-steps, and a resumed run (whose schedule is its checkpoint's)
    the --max-steps that finishes the warm-up."""
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(image_dir), "--out", str(out), "--max-steps", "1",
                 "--schedule-steps", "40"]) == 0
    printed = capsys.readouterr().err  # a warning: stderr
    assert "inside its 10-step warm-up" in printed and "drop --epochs" not in printed
    assert "lower --schedule-steps" in printed
    assert main(["pretrain", "--out", str(out), "--resume", "auto", "--max-steps", "2"]) == 0
    printed = capsys.readouterr().err  # a warning: stderr
    assert "inside its 10-step warm-up" in printed and "drop --epochs" not in printed
    assert "a resumed run keeps its schedule: pass --max-steps 10 or more" in printed


@pytest.mark.slow  # starts a loader worker process
def test_a_loader_worker_the_system_killed_is_one_line_and_exit_1(tmp_path, capsys, image_dir, monkeypatch):
    """As the kernel's out-of-memory killer stops a worker: torch's RuntimeError was a traceback."""
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
    assert said in err, err
    assert safe_load(out / "last.pt")["step"] == 2
