"""A settings file given as --config and what --print-config writes: read back as the same run, read from a pipe
or in YAML's encodings, refused unread past its size, a setting it holds named as its line in a refusal, and file
and folder settings recorded absolute.

Everything here stops at --print-config or a ConfigError: no training."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from config_cli import _resolve, _yaml

from lomar.cli.app import main
from lomar.train.config import PretrainConfig


def test_an_out_from_the_settings_file_that_holds_a_run_is_named_as_its_line(tmp_path, capsys):
    """"--out" would send a user whose out came from --config to look for a flag they did not give."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("method: lomar\n")
    config = _yaml(tmp_path, f"out: {tmp_path / 'run'}\n")
    assert main(["pretrain", "--config", config]) == 2
    assert capsys.readouterr().err.endswith(f"error: out: {tmp_path / 'run'} in {config} already holds a run; "
                                            f"pass --resume auto to continue it, --overwrite to replace it, or "
                                            f"another --out\n")
    assert main(["pretrain", "--config", config, "--out", str(tmp_path / "run")]) == 2
    assert f"error: --out {tmp_path / 'run'} already holds a run;" in capsys.readouterr().err  # the flag's


def test_an_out_from_the_settings_file_is_named_as_its_line_in_each_refusal_of_the_folder(tmp_path, capsys):
    """Beside 'already holds a run' (3ce5829), the folder's other refusals said '--out r1' too."""
    from lomar.errors import UsageError
    from lomar.train.run_lock import RunLock
    from lomar.train.run_state import prepare_run_folder

    (tmp_path / "data").mkdir()
    (tmp_path / "afile").touch()
    config = _yaml(tmp_path, f"out: {tmp_path / 'data' / 'r1'}\ndata: {tmp_path / 'data'}\n")
    assert main(["pretrain", "--config", config]) == 2
    assert capsys.readouterr().err.endswith(f"error: out: {tmp_path / 'data' / 'r1'} in {config} is inside data: "
                                            f"{tmp_path / 'data'} in {config}: the run's files would join the data "
                                            f"it reads; put the run elsewhere\n")
    config = _yaml(tmp_path, f"out: {tmp_path / 'afile'}\n")
    assert main(["pretrain", "--config", config]) == 2
    assert f"error: out: {tmp_path / 'afile'} in {config} is a file, not a folder;" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("method: lomar\n")
    config = _yaml(tmp_path, f"out: {tmp_path / 'run'}\n")
    with RunLock(tmp_path / "run"):  # a live run's folder
        assert main(["pretrain", "--config", config]) == 2
    assert f"error: out: {tmp_path / 'run'} in {config} is in use by another run (" in capsys.readouterr().err
    (tmp_path / "theirs" / "tb").mkdir(parents=True)  # no run: no config.yaml, no checkpoint
    config = PretrainConfig(out=str(tmp_path / "theirs"))
    config.in_file = {"out": "my.yaml"}  # as resolve records it
    with pytest.raises(UsageError, match=r"^out: \S+theirs in my.yaml holds tb, which a new run would delete"):
        prepare_run_folder(config, SimpleNamespace(name="pretrain", outputs=()), None, 0, 0)


@pytest.mark.parametrize("argv, held, said", [
    (["segment"], "predictions", "already holds predictions/"),
    (["detect", "--val-ann", "a.json", "--val-images", "v"], "predictions.json", "already holds a predictions.json")])
def test_an_eval_only_out_from_the_settings_file_is_named_as_its_line(tmp_path, capsys, monkeypatch, argv, held,
                                                                      said):
    """As a run's folder is (the scores an --eval-only wrote there, which it does not replace)."""
    import lomar.train.detect_config
    import lomar.train.segment_config

    for module in (lomar.train.detect_config, lomar.train.segment_config):  # the model: not what this is about
        monkeypatch.setattr(module, "check_eval_only_model", lambda *args: None)
    (tmp_path / "scored").mkdir()
    (tmp_path / "scored" / held).touch()
    config = _yaml(tmp_path, f"out: {tmp_path / 'scored'}\neval_only: true\n")
    assert main([*argv, "--config", config]) == 2
    assert f"error: out: {tmp_path / 'scored'} in {config} {said} (" in capsys.readouterr().err


def test_a_time_limit_in_the_settings_file_reads_as_the_flags(tmp_path, capsys):
    """`time_limit: 1.5` (a YAML number) reads as --time-limit 1.5 does, 2 s, not 'must be a whole number'."""
    for argv in (["--config", _yaml(tmp_path, "time_limit: 1.5\n")], ["--time-limit", "1.5"]):
        assert _resolve(tmp_path, *argv) == 0, capsys.readouterr().err
        assert yaml.safe_load(capsys.readouterr().out)["time_limit"] == 2


def test_print_config_with_an_out_that_holds_a_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("method: lomar\n")
    assert _resolve(tmp_path, "--windows", "3") == 0
    assert yaml.safe_load(capsys.readouterr().out)["windows"] == 3


@pytest.mark.parametrize("command", [["pretrain", "--data", "DATA"], ["pretrain", "--method", "mae", "--data", "DATA"],
                                     ["detect", "--train-ann", "ANN", "--val-ann", "ANN"],
                                     ["segment", "--data", "DATA", "--num-classes", "3"]])
def test_a_printed_config_reads_back_as_the_same_config(tmp_path, capsys, command):
    """What --print-config shows (and a run saves as config.yaml), given back as --config, is the same run:
    its nulls are defaults, not settings given."""
    (tmp_path / "data").mkdir()
    (tmp_path / "ann.json").write_text("{}")
    values = {"DATA": str(tmp_path / "data"), "ANN": str(tmp_path / "ann.json")}
    args = [values.get(a, a) for a in command] + ["--out", str(tmp_path / "run"), "--print-config"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    saved = _yaml(tmp_path, printed)
    assert main([command[0], "--config", saved, "--print-config"]) == 0, capsys.readouterr().err
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(printed)


def test_a_printed_config_of_a_resume_given_back_is_refused_as_what_it_is(tmp_path, capsys):
    """--print-config shows the invocation's --resume; given back, the refusal called the file an older lomar's
    config.yaml."""
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--resume", "auto", "--print-config"]) == 0
    printed = _yaml(tmp_path, capsys.readouterr().out)
    assert main(["pretrain", "--config", printed, "--out", str(tmp_path / "new"), "--print-config"]) == 2
    assert f"{printed} records an invocation's resume: auto (it is --print-config's output of one" in \
        capsys.readouterr().err


@pytest.mark.parametrize("content", [b"\xff\xd8\xff\xe0\x00\x10JFIF binary", None])
def test_a_config_that_is_no_text_file_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content) if content is not None else path.mkdir()
    assert main(["pretrain", "--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err
    assert ("is not valid YAML" if content else "is not a file; give one") in err


def test_a_config_is_read_in_yamls_encodings_not_the_locales(tmp_path, capsys):
    """PowerShell's `lomar pretrain --print-config > my.yaml` writes UTF-16 with a BOM, which YAML reads and the
    locale's decoding refused ('utf-8' codec can't decode byte 0xff); Latin-1 text is told to be saved as UTF-8."""
    path = tmp_path / "cfg.yaml"
    path.write_bytes("seed: 7\nout: runé\n".encode("utf-16"))
    assert main(["pretrain", "--config", str(path), "--print-config"]) == 0, capsys.readouterr().err
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["seed"] == 7 and resolved["out"] == "runé"
    path.write_bytes("seed: 7  # déjà\n".encode("latin-1"))
    assert main(["pretrain", "--config", str(path), "--print-config"]) == 2
    assert capsys.readouterr().err.endswith(": it is not UTF-8 text (invalid continuation byte at byte 13); save it "
                                            "as UTF-8\n")


def test_a_config_past_a_settings_files_size_is_refused_unread(tmp_path, capsys):
    """A COCO annotation file given as --config is refused by its size, unparsed (parsed whole, 1.5 MiB takes 25 s;
    train2017's 450 MiB, hours)."""
    from lomar.yaml_io import MAX_BYTES

    path = tmp_path / "instances_train.json"
    path.write_text("seed: 1\n" + "#" * MAX_BYTES)
    assert main(["pretrain", "--config", str(path), "--print-config"]) == 2
    assert capsys.readouterr().err == (f"lomar pretrain: error: config file {path} is 1.0 MiB, which no settings file "
                                       f"is (at most 1 MiB; a config is a few KiB); is it the file meant?\n")


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="a pipe's /dev/fd path")
def test_a_config_from_a_pipe_is_read(tmp_path, capsys):
    """`--config <(sed ... base.yaml)`: the shell's pipe is read, not refused as 'is not a file'."""
    import os

    read, write = os.pipe()
    os.write(write, b"seed: 5\n")
    os.close(write)
    try:
        assert main(["pretrain", "--config", f"/dev/fd/{read}", "--print-config"]) == 0, capsys.readouterr().err
    finally:
        os.close(read)
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 5


def test_file_and_folder_settings_are_recorded_absolute_so_a_run_resumes_from_any_folder(tmp_path, monkeypatch,
                                                                                         no_run_figures):
    """``--data images`` is recorded absolute: recorded as given, a resume would look for it under its own working
    folder."""
    from helpers import pretrain, write_images
    from lomar.checkpoints.io import safe_load

    write_images(tmp_path / "first" / "images", 8)
    monkeypatch.chdir(tmp_path / "first")
    assert pretrain("--data", "images", "--out", "runs/a", "--max-steps", "1", "--schedule-steps", "2") == 0
    saved = yaml.safe_load((tmp_path / "first/runs/a/config.yaml").read_text())
    assert saved["data"] == str(tmp_path / "first" / "images")
    monkeypatch.chdir(tmp_path)
    assert pretrain("--out", "first/runs/a", "--max-steps", "2", "--resume", "auto") == 0
    assert safe_load(tmp_path / "first/runs/a/last.pt")["step"] == 2
    monkeypatch.chdir(tmp_path / "first")  # the same path given again, relative to another folder, is no change
    assert pretrain("--data", "images", "--out", "runs/a", "--max-steps", "2", "--resume", "auto") == 0


@pytest.mark.parametrize("command, paths", [
    ("finetune", {"pretrained": "ckpt.pt", "data": "d", "train": "tr", "val": "va"}),
    ("detect", {"train_ann": "a.json", "train_images": "im", "val_ann": "b.json", "val_images": "im",
                "pretrained": "p"}),
    ("segment", {"data": "ade", "pretrained": "p"}),
    ("pretrain", {"data": "shards/*.tar", "knn_data": "knn", "tokenizer": "~/tok.safetensors"}),
])
def test_every_commands_file_and_folder_settings_resolve_absolute(command, paths):
    from lomar.train.config import PretrainConfig
    from lomar.train.detect_config import DetectConfig
    from lomar.train.finetune_config import FinetuneConfig
    from lomar.train.segment_config import SegmentConfig
    from lomar.train.task_config import absolute_paths

    cls = {"finetune": FinetuneConfig, "detect": DetectConfig, "segment": SegmentConfig, "pretrain": PretrainConfig}
    expected = {k: str(Path(v).expanduser().absolute()) for k, v in paths.items()}
    assert absolute_paths(cls[command], {**paths, "out": "o", "seed": 1}) == expected
    assert absolute_paths(cls[command], dict.fromkeys(paths, " ")) == {}  # the non-empty check names them


def test_a_knn_data_from_the_settings_file_without_knn_every_is_named_as_its_line(tmp_path, capsys):
    """knn_data in --config with --knn-every 0 given: the refusal said 'drop --knn-data', a flag the user never gave."""
    (tmp_path / "knn" / "train").mkdir(parents=True)
    (tmp_path / "knn" / "val").mkdir()
    config = _yaml(tmp_path, f"knn_data: {tmp_path / 'knn'}\nknn_every: 2\n")
    assert _resolve(tmp_path, "--config", config, "--knn-every", "0") == 2
    assert capsys.readouterr().err.endswith(f"error: knn_data: {tmp_path / 'knn'} in {config} is used only with "
                                            f"--knn-every N (a k-NN evaluation every N epochs); add --knn-every 1, "
                                            f"or drop knn_data from {config}\n")
