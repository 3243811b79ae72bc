"""Bad invocations end in one line, ``lomar CMD: error: …``, before any work, and never in a traceback: the table of
bad flags and inputs, checkpoints of another kind, unknown flags, environment limits, and messages made one line
(bugs keep their traceback)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from error_checks import _fail_with, _one_error_line

from lomar.cli.app import main

CK = "{tmp}/ckpt.pt"  # exists but holds no checkpoint: every case must fail before reading it
DATA = ["--data", "{tmp}/data"]
BAD = [
    # knn
    ("knn", [CK, *DATA, "--device", "tpu"], "tpu"),
    ("knn", [CK, *DATA, "--device", "cuda:x"], "cuda:x"),
    ("knn", [CK, *DATA, "--device", "cuda:99"], "cuda:99"),
    ("knn", [CK, *DATA, "--temperature", "nan"], "--temperature"),
    ("knn", [CK, *DATA, "--temperature", "0"], "--temperature"),
    ("knn", [CK, *DATA, "--temperature", "inf"], "--temperature"),
    ("knn", [CK, *DATA, "--k", "0"], "--k"),
    ("knn", [CK, *DATA, "--workers", "-1"], "--workers"),
    ("knn", [CK, *DATA, "--img-size", "0"], "--img-size"),
    ("knn", [CK, *DATA, "--img-size", "100000"], "--img-size"),
    ("knn", [CK], "--data"),
    ("knn", [CK, "--data", "{tmp}/nowhere"], "nowhere"),
    ("knn", ["{tmp}/missing.pt", *DATA], "missing.pt"),
    ("knn", [CK, *DATA, "--json", "{tmp}/file/sub.json"], "is a file"),
    ("knn", [CK, *DATA, "--json", "{tmp}/dir"], "is a folder"),
    ("knn", [CK, *DATA, "--json", "/dev/null"], "/dev/null"),
    ("knn", [CK, *DATA, "--json", "/proc/lomar.json"], "/proc"),
    # linprobe
    ("linprobe", [CK, *DATA, "--lr", "nan"], "--lr"),
    ("linprobe", [CK, *DATA, "--lr", "-1"], "--lr"),
    ("linprobe", [CK, *DATA, "--epochs", "0"], "--epochs"),
    ("linprobe", [CK, *DATA, "--weight-decay", "-1"], "--weight-decay"),
    ("linprobe", [CK, *DATA, "--probe-batch-size", "0"], "--probe-batch-size"),
    ("linprobe", [CK, *DATA, "--probe-batch-size", "1"], "--probe-batch-size"),
    ("linprobe", [CK, *DATA, "--save", "{tmp}/file/probe.pt"], "is a file"),
    ("linprobe", [CK, *DATA, "--save", "{tmp}/dir"], "is a folder; give a file name such as "),
    ("linprobe", [CK, *DATA, "--json", "/proc/self/x/out.json"], "/proc"),
    # export
    ("export", [CK, "--to", "{tmp}/file"], "is a file"),
    ("export", [CK, "--to", "{tmp}/file/sub"], "is a file"),
    ("export", [CK, "--to", "/proc/lomar-export"], "/proc"),
    ("export", [CK, "--to", "{tmp}/exported"], "--overwrite"),
    ("export", [CK, "--to", "{tmp}/out", "--img-size", "0"], "--img-size"),
    ("export", ["{tmp}/missing.pt", "--to", "{tmp}/out"], "missing.pt"),
    ("export", [CK], "--to"),
    # visualize
    ("visualize", [CK, "--attention-window", "0"], "--attention-window"),
    ("visualize", [CK, "--seed", "-1"], "--seed"),
    ("visualize", [CK, "--target-patch", "-1", "0"], "--target-patch"),
    ("visualize", [CK, "--out", "{tmp}/file"], "is a file"),
    ("visualize", [CK, "--out", "{tmp}/file/sub"], "is a file"),
    ("visualize", [CK, "--out", "/proc/lomar-figures"], "/proc"),
    ("visualize", [CK, "--out", ""], "--out is empty; give a path"),  # Path("") is the working folder
    ("visualize", [CK, "--attention-window", "3"], "--attention-window is for the attention figures; add --attention"),
    ("visualize", [CK, "--masked"], "--masked is for the attention figures; add --attention"),
    ("visualize", ["{tmp}/missing.pt", "--masked"], "--masked is for the attention figures"),  # the flags first
    ("export", [CK, "--to", ""], "--to is empty; give a path"),
    ("export", ["{tmp}/missing.pt", "--to", "{tmp}/file/x"], "is a file"),  # --to's checks come first
    ("visualize", [CK, "{tmp}/missing.png"], "image {tmp}/missing.png does not exist; pass image files"),
    ("visualize", [CK, "/dev/null"], "image /dev/null is not a file; pass image files (PNG, JPEG, …) or folders"),
    ("visualize", [CK, "--windows", "0"], "--windows"),
    ("pretrain", ["--out", "{tmp}/run", "--figure-images", "65"], "--figure-images must be at most 64"),
    ("linprobe", [CK, "--data", "{tmp}/data", "--json", "{tmp}/same.json", "--save", "{tmp}/same.json"],
     "--json and --save both name"),
    ("detect", ["--train-ann", "{tmp}/nowhere.json", "--train-images", "{tmp}/dir", "--val-ann", "{tmp}/gone.json",
                "--val-images", "{tmp}/dir", "--out", "{tmp}/run"], "--val-ann {tmp}/gone.json does not exist"),
    # load-original
    ("load-original", [CK, "--to", "{tmp}/new.pt", "--img-size", "0"], "--img-size"),
    ("load-original", [CK, "--to", "{tmp}/new.pt", "--num-heads", "0"], "--num-heads"),
    ("load-original", [CK, "--to", "{tmp}/dir"], "is a folder"),
    ("load-original", [CK, "--to", "{tmp}/file"], "--overwrite"),
    ("load-original", [CK, "--to", "/dev/null", "--overwrite"], "/dev/null"),
    ("load-original", [CK, "--to", "{tmp}/file/sub.pt"], "is a file"),
    ("load-original", [CK, "--to", "{tmp}/nowhere/new.pt"], "does not exist"),
    ("load-original", [CK, "--to", "/proc/lomar.pt"], "/proc"),
    ("load-original", ["{tmp}/missing.pth", "--to", "{tmp}/new.pt"], "missing.pth"),
    ("load-original", ["{tmp}/missing.pth", "--to", "{tmp}/file/sub.pt"], "is a file"),  # --to's checks come first
    # bench
    ("bench", ["--tiny", "--threads", "-1"], "--threads"),
    ("bench", ["--tiny", "--threads", "0"], "--threads"),
    ("bench", ["--tiny", "--device", "tpu"], "tpu"),
    ("bench", ["--tiny", "--batch-size", "0"], "--batch-size"),
    ("bench", ["--tiny", "--steps", "0"], "--steps"),
    ("bench", ["--tiny", "--warmup", "-1"], "--warmup"),
    ("bench", ["--tiny", "--sizes", "0"], "--sizes"),
    ("bench", ["--tiny", "--model", "vit_nope_patch16"], "--model"),
    ("bench", ["--tiny", "--sizes", "128", "--json", "{tmp}/dir"], "is a folder; give a file name such as "),
    ("bench", ["--tiny", "--sizes", "128", "--json", "/dev/null"], "/dev/null"),
    ("bench", ["--tiny", "--sizes", "128", "--json", "/proc/bench.json"], "/proc"),
    ("bench", ["--tiny", "--sizes", "128", "--plot", "{tmp}/file/plot.png"], "is a file"),
    # tokenizer
    ("tokenizer fit", ["--data", "{tmp}/nowhere", "--out", "{tmp}/t.safetensors"], "nowhere does not exist"),
    ("tokenizer fit", ["--data", "{tmp}/dir", "--out", "{tmp}/t.safetensors"], "{tmp}/dir"),
    ("tokenizer fit", ["--data", "{tmp}/file", "--out", "{tmp}/t.safetensors"], "{tmp}/file"),
    ("tokenizer fit", ["--data", "{tmp}/s-{0..1}.tar", "--out", "{tmp}/t.safetensors"], "not tar shards"),
    ("tokenizer fit", ["--data", "{tmp}/nowhere", "--out", "{tmp}/file/t.safetensors"], "is a file"),
    ("tokenizer fit", ["--data", "{tmp}/nowhere", "--out", "{tmp}/t.pt"], ".safetensors"),
    ("tokenizer convert", ["{tmp}/missing.pkl", "--to", "{tmp}/d.safetensors"], "missing.pkl"),
    ("tokenizer convert", [CK, "--to", "{tmp}/file/d.safetensors"], "is a file"),
    ("tokenizer convert", ["{tmp}/missing.pkl", "--to", "{tmp}/file/d.safetensors"], "is a file"),
    # the top level
    ("nonsense", [], "invalid choice"),
]


def test_visualize_says_where_a_dangling_image_link_leads(tmp, capsys):
    (tmp / "photo.jpg").symlink_to(tmp / "unmounted" / "photo.jpg")  # `ls` lists it: "not a file" said too little
    assert main(["visualize", str(tmp / "ckpt.pt"), str(tmp / "photo.jpg")]) == 2
    assert _one_error_line(capsys.readouterr().err, "visualize") == (
        f"lomar visualize: error: image {tmp}/photo.jpg is a link to {tmp}/unmounted/photo.jpg, which does not exist; "
        f"pass image files (PNG, JPEG, …) or folders")
    (tmp / "chain.jpg").symlink_to("photo.jpg")  # a link to that link: which name is missing, as for a data set's
    assert main(["visualize", str(tmp / "ckpt.pt"), str(tmp / "chain.jpg")]) == 2
    assert _one_error_line(capsys.readouterr().err, "visualize") == (
        f"lomar visualize: error: image {tmp}/chain.jpg is a link to photo.jpg, which links on to "
        f"{os.path.realpath(tmp / 'unmounted' / 'photo.jpg')}, which does not exist; pass image files (PNG, JPEG, …) "
        f"or folders")


@pytest.mark.parametrize("command, flags, named", BAD, ids=[f"{c} {' '.join(f)}"[:60] for c, f, _ in BAD])
def test_bad_invocation_is_one_line(command, flags, named, tmp, capsys):
    argv = [*command.split(), *(f.replace("{tmp}", str(tmp)) for f in flags)]
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    code = main(argv)
    said = capsys.readouterr()
    line = _one_error_line(said.err, command)
    assert code == 2
    assert said.out == ""  # no progress line before the refusal (such as tokenizer fit's "fitting")
    assert named.replace("{tmp}", str(tmp)) in line  # the message names the value or flag at fault
    if "is a folder; give a file name such as " in named:  # a name the command takes, not a bare "result"
        example = Path(line.split("such as ")[1])
        assert example.parent == tmp / "dir" and example.suffix in (".json", ".pt"), line
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), OSError(errno.EIO, "I/O error"), TypeError("a bug")])
def test_bugs_keep_their_traceback(exc, monkeypatch):
    _fail_with(monkeypatch, exc)
    with pytest.raises(type(exc)):
        main(["export", "ckpt", "--to", "out"])


def test_multi_line_and_coloured_messages_become_one_line(monkeypatch, capsys):
    from lomar.errors import UsageError

    _fail_with(monkeypatch, UsageError("unsafe pickle:\n\x1b[1mWeightsUnpickler error\x1b[0m: bad global"))
    assert main(["export", "ckpt", "--to", "out"]) == 2
    line = _one_error_line(capsys.readouterr().err, "export")
    assert line == "lomar export: error: unsafe pickle: WeightsUnpickler error: bad global"


@pytest.mark.parametrize("command, args", [("pretrain", []), ("knn", ["ckpt"]), ("visualize", ["ckpt"])])
def test_an_unknown_flag_is_the_commands_own_error(command, args, capsys):
    assert main([command, *args, "--bogus", "x"]) == 2
    assert capsys.readouterr().err == (f"lomar {command}: error: unrecognized arguments: --bogus x "
                                       f"(see lomar {command} --help)\n")


@pytest.mark.parametrize("name, value", [("LOMAR_MAX_IMAGE_PIXELS", "abc"), ("LOMAR_MAX_IMAGE_PIXELS", "-1"),
                                         ("LOMAR_MAX_IMAGE_BYTES", "0")])
def test_a_bad_image_limit_in_the_environment_is_one_line_before_any_work(name, value, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(name, value)
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    default = {"LOMAR_MAX_IMAGE_PIXELS": 178956970, "LOMAR_MAX_IMAGE_BYTES": 268435456}[name]
    assert err == (f"lomar pretrain: error: {name} must be a positive integer, got {value!r}; unset it or set "
                   f"e.g. {default} (the default)\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, other, marks", [
    ("pretrain", "finetune", {"format": "lomar-finetune-1"}), ("finetune", "pretrain", {"format": "lomar-pretrain-2"}),
    ("segment", "detect", {"format": "lomar-detect-1"}), ("detect", "segment", {"task": "segment"})])
def test_resuming_another_commands_checkpoint_names_that_command(command, other, marks, tmp_path, capsys):
    import torch

    checkpoint = tmp_path / "other" / "last.pt"
    checkpoint.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(1)}, "optimizer": {}, "config": {}, "settings": {}, **marks}, checkpoint)
    assert main([command, "--resume", str(checkpoint), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (
        f"lomar {command}: error: --resume {checkpoint} is a `lomar {other}` checkpoint, not a `lomar {command}` "
        f"one; resume it with `lomar {other}`, or start a new run with another --out\n")


@pytest.mark.parametrize("marks, command", [({"format": "lomar-detect-1"}, "detect"), ({"task": "segment"}, "segment")])
def test_a_detector_or_segmenter_given_as_an_encoder_is_named(marks, command, tmp_path, capsys):
    import torch

    checkpoint = tmp_path / "last.pt"
    torch.save({"model": {"backbone.w": torch.zeros(1)}, **marks}, checkpoint)
    assert main(["knn", str(checkpoint), "--data", str(tmp_path)]) == 2
    assert f"is a whole `lomar {command}` model, not an encoder; pass the encoder" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export", "knn"])
def test_a_plain_pickle_is_one_line_without_torchs_protocol_warning(command, tmp_path, capsys):
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    args = [str(path), "--to", str(tmp_path / "out")] if command == "export" else [str(path), "--data", str(tmp_path)]
    assert main([command, *args]) == 2
    line = _one_error_line(capsys.readouterr().err, command)
    assert line.endswith(f"{path}: it is a Python pickle, not a checkpoint written by torch.save")


def test_a_dvae_that_is_not_a_pickle_is_not_called_one(tmp_path, capsys):
    path = tmp_path / "random.pt"
    path.write_bytes(b"\x01" + bytes(range(256)))
    assert main(["tokenizer", "convert", str(path), "--to", str(tmp_path / "tok.safetensors")]) == 2
    line = _one_error_line(capsys.readouterr().err, "tokenizer convert")
    assert f"refusing to load {path}: it is a file in an unknown format, not a dVAE; use" in line


@pytest.mark.parametrize("pattern", ["shard-*.tar", "shard-000.tar"])
def test_tokenizer_fit_says_it_reads_no_tar_shards(tmp_path, capsys, pattern):
    (tmp_path / "shard-000.tar").write_bytes(b"")
    data = str(tmp_path / pattern)
    assert main(["tokenizer", "fit", "--data", data, "--out", str(tmp_path / "tok.safetensors")]) == 2
    line = _one_error_line(capsys.readouterr().err, "tokenizer fit")
    assert f"--data {data}: tokenizer fit reads an image folder or a .txt list of paths, not tar shards" in line
    assert "lomar pretrain --method beit" in line
