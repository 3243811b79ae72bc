"""`lomar pretrain` refusing a bad configuration, invocation or set-up: one line and exit 2 (printed once under
torchrun, whatever LOCAL_RANK a job left), no folder created, and the command a refusal names runs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY, losses
from lomar.cli import app
from lomar.cli.app import main


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
    32`: that command runs (its default view is 14 x --patch, not a fixed 112 px that 32 does not divide) and so
    does the run with its file; a file that is no tokenizer is named as such."""
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


def test_shards_without_a_readable_image_blame_the_data_not_the_batch(tmp_path, capsys):
    shard = tmp_path / "random.tar"
    shard.write_bytes(bytes(range(256)) * 12)
    code = main(["pretrain", *TINY, "--data", str(shard), "--out", str(tmp_path / "run")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last == (f"lomar pretrain: error: --data {shard} holds no image that could be read (see the "
                                  f"skipped files above); fix the data")


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
