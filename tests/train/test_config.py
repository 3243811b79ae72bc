"""`lomar pretrain` configuration: YAML typing, range checks, --data patterns, --print-config.

Everything here stops at --print-config or a ConfigError: no training."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lomar.cli.app import main
from lomar.train.config import PretrainConfig
from lomar.train.detect_config import DetectConfig
from lomar.train.finetune_config import FinetuneConfig
from lomar.train.segment_config import SegmentConfig
from lomar.train.settings import declarations


def _resolve(tmp_path: Path, *args: str) -> int:
    return main(["pretrain", "--out", str(tmp_path / "run"), *args, "--print-config"])


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_a_given_blr_sets_the_lr_in_the_demo_preset_too(tmp_path, capsys):
    """--blr clears the recipe's absolute lr, the demo preset's 1e-3 too: the blr given sets the lr."""
    assert _resolve(tmp_path, "--blr", "1e-2") == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["preset"] == "demo" and resolved["blr"] == 1e-2 and resolved["lr"] is None
    assert _resolve(tmp_path, "--blr", "1e-2", "--lr", "2e-3") == 0  # both given: the absolute lr wins, as ever
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == 2e-3
    assert _resolve(tmp_path) == 0  # neither: the demo's own lr
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == 1e-3


def test_yaml_values_take_their_field_types(tmp_path, capsys):
    config = _yaml(tmp_path, "lr: 1e-3\nmin-lr: 1e-6\nbatch_size: 8.0\nblr: 2\nepochs: '50'\nout: 2024\n")
    assert main(["pretrain", "--config", config, "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["lr"] == 1e-3 and resolved["min_lr"] == 1e-6 and resolved["blr"] == 2.0
    assert resolved["batch_size"] == 8 and isinstance(resolved["batch_size"], int) and resolved["epochs"] == 50
    assert resolved["out"] == "2024"


@pytest.mark.parametrize("text, message", [
    ("batch_size: 2.5\n", "must be a whole number"),
    ("lr: fast\n", "is not a number; write e.g. lr: 1e-3"),
    ("seed: four\n", "is not a number; write e.g. seed: 0"),  # a whole number's example is one
    ("compile: 'no'\n", "must be true or false"),
    # the default as an example, in YAML's spelling: what windows or betas take
    ("model: null\n", "model: null in "),
    ("windows: null\n", "is not allowed: windows takes a value, e.g. windows: auto; write one or remove the line"),
    ("betas: null\n", "betas takes a value, e.g. betas: [0.9, 0.95]; write one"),
    ("compile: null\n", "compile takes a value, e.g. compile: false;"),
    ("1: 2\n", "setting names"),
    ("windows: [1, 2]\n", "must be a string"),
    ("seed: true\n", "must be a number"),
    ("batch_size: 8\nlr: 1e-3\nbatch_size: 16\n", "batch_size is given twice (lines 1 and 3); keep one"),
])
def test_yaml_values_of_the_wrong_type_are_usage_errors(tmp_path, capsys, text, message):
    assert main(["pretrain", "--config", _yaml(tmp_path, text), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("command, text, said", [
    ("finetune", "aa: null\n", "aa takes a value, e.g. aa: rand-m9-mstd0.5-inc1, or aa: none for off; write one or "
                               "remove the line"),
    ("segment", "rel_pos: null\n", "rel_pos takes a value, e.g. rel_pos: auto, or rel_pos: none for off; write one"),
])
def test_a_null_for_a_setting_with_an_off_value_is_told_to_write_it(tmp_path, capsys, command, text, said):
    """null is 'off' to some (timm's aa: null) and 'the default' to others: the off value is named, as --help does."""
    assert main([command, "--config", _yaml(tmp_path, text), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1


def test_every_setting_with_a_none_choice_and_another_default_declares_it_as_off():
    lacking = [(cls.COMMAND, name) for cls in (PretrainConfig, FinetuneConfig, DetectConfig, SegmentConfig)
               for name, s in declarations(cls).items()
               if "none" in (s.choices or ()) and s.default is not None and s.off != "none"]
    assert lacking == []


@pytest.mark.parametrize("flags, message", [
    (["--blr", "-1"], "--blr must be >= 0"),
    (["--lr", "-0.1"], "--lr must be >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--min-lr=-1e-6"], "--min-lr must be >= 0"),
    (["--warmup-epochs", "5", "--epochs", "2"], "--warmup-epochs must be in [0, --epochs 2]"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0, got -1"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr 0.001 is above --lr"),
    (["--clip-grad", "0"], "--clip-grad must be positive"),
    (["--img-size", "0"], "--img-size must be positive"),
    (["--mask-ratio", "nan"], "--mask-ratio must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    # layer scale multiplies each residual branch: 1e30 was accepted and gave a NaN loss at step 1
    (["--method", "beit", "--layer-scale-init", "1e30"], "--layer-scale-init must be in (0, 1], got 1e+30"),
])
def test_out_of_range_numbers_are_usage_errors(tmp_path, capsys, flags, message):
    assert _resolve(tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_mae_takes_only_absolute_positions(tmp_path, capsys):
    """MAE is built on fixed absolute position embeddings (Method.only_pos): another --pos is refused up front."""
    assert _resolve(tmp_path, "--method", "mae", "--pos", "rpe") == 2
    assert capsys.readouterr().err.endswith("--method mae needs --pos abs (got rpe)\n")
    assert _resolve(tmp_path, "--method", "lomar", "--pos", "abs") == 0


@pytest.mark.parametrize("knn_data, said", [(None, "; pass it, or --knn-every 0"), ("DIR", "; DIR does not")])
def test_knn_every_without_a_knn_set_says_what_is_missing(tmp_path, capsys, knn_data, said):
    """No --knn-data is said as missing, not as "got None"."""
    given = ["--knn-data", str(tmp_path)] if knn_data else []
    assert _resolve(tmp_path, "--knn-every", "5", *given) == 2
    assert capsys.readouterr().err.endswith("--knn-every 5 needs --knn-data ROOT holding train/ and val/ class folders"
                                            f"{said.replace('DIR', str(tmp_path))}\n")


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


def _write_shard(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))


@pytest.mark.parametrize("pattern", ["shard-?.tar", "shard-[0-1].tar", "shard-*.tar", "shard-{0..1}.tar"])
def test_data_shard_patterns_are_accepted(tmp_path, capsys, pattern):
    for i in range(2):
        _write_shard(tmp_path / f"shard-{i}.tar")
    assert _resolve(tmp_path, "--data", str(tmp_path / pattern)) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"] == str(tmp_path / pattern)


@pytest.mark.parametrize("pattern, message", [
    ("none-?.tar", "no tar shards match"),
    ("imgs/*.png", "a pattern must name .tar shards"),
])
def test_data_patterns_that_cannot_work_are_usage_errors(tmp_path, capsys, pattern, message):
    assert _resolve(tmp_path, "--data", str(tmp_path / pattern)) == 2
    assert message in capsys.readouterr().err


def test_data_folder_with_brackets_in_its_name(tmp_path, capsys):
    folder = tmp_path / "photos[2024]"
    folder.mkdir()
    assert _resolve(tmp_path, "--data", str(folder)) == 0


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "old is a folder holding no run's checkpoint (last.pt or checkpoint-N); pass a training"),
    (lambda p: (p.mkdir(), (p / "last.pt").write_bytes(b"")), str(Path("old", "last.pt")) + ", or --out"),
    (lambda p: (p.mkdir(), (p / "checkpoint-000004.pt").write_bytes(b"")), "pass one of its checkpoint-N files"),
    (lambda p: (p.mkdir(), (p / "model.safetensors").write_bytes(b"")),
     "old is an exported encoder's folder: weights without a run's training state"),
    (lambda p: p.write_bytes(b"not a checkpoint"), "cannot read checkpoint"),
])
def test_resume_path_that_cannot_be_resumed(tmp_path, capsys, make, message):
    target = tmp_path / "old"
    make(target)
    assert _resolve(tmp_path, "--resume", str(target)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_resume_checkpoint_without_training_state(tmp_path, capsys):
    import torch

    torch.save({"model": {}}, tmp_path / "weights.pt")
    assert _resolve(tmp_path, "--resume", str(tmp_path / "weights.pt")) == 2
    assert "not a `lomar pretrain` training checkpoint" in capsys.readouterr().err


def test_resume_auto_before_the_first_checkpoint_reads_config_yaml(tmp_path, capsys):
    # The run stopped before its first checkpoint: config.yaml is all there is; its values are typed.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: vit_small_patch16\nlr: '1e-3'\nbatch_size: 32\n")
    assert _resolve(tmp_path, "--resume", "auto", "--max-steps", "7") == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["model"], resolved["lr"], resolved["batch_size"]) == ("vit_small_patch16", 1e-3, 32)
    assert resolved["max_steps"] == 7 and resolved["resume"] == "auto"
    assert _resolve(tmp_path, "--resume", "auto", "--batch-size", "16") == 2
    assert "--batch-size 16 differs from 32" in capsys.readouterr().err
    (tmp_path / "run" / "config.yaml").write_text("batch_size: 32\n")  # its lr derived from --blr
    assert _resolve(tmp_path, "--resume", "auto", "--lr", "0.1") == 2
    assert "--lr 0.1 differs from the default (unset) in the run being resumed" in capsys.readouterr().err
    (tmp_path / "run" / "config.yaml").write_text("batch_size: 2.5\n")
    assert _resolve(tmp_path, "--resume", "auto") == 2
    assert "batch_size: 2.5" in capsys.readouterr().err


def test_the_config_file_given_again_with_resume_keeps_the_runs_max_steps(tmp_path, capsys):
    """`--config c.yaml --max-steps 3`, then the same `--config c.yaml --resume auto`: the file's unchanged epochs
    counted as a new --epochs, dropped the run's --max-steps 3 and trained on to the epochs' end."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("epochs: 2\nmax_steps: 3\nwarmup_epochs: 1\n")
    config = _yaml(tmp_path, "epochs: 2\n")
    assert _resolve(tmp_path, "--config", config, "--resume", "auto") == 0
    assert yaml.safe_load(capsys.readouterr().out)["max_steps"] == 3
    for changed in (["--config", _yaml(tmp_path, "epochs: 5\n")], ["--epochs", "2"]):  # a new end, as before
        assert _resolve(tmp_path, *changed, "--resume", "auto") == 0
        assert yaml.safe_load(capsys.readouterr().out)["max_steps"] is None


def test_a_resume_names_the_yaml_file_a_differing_setting_came_from(tmp_path, capsys):
    """"drop --lr" alone would say nothing to a user whose lr came from --config: the fix is a line of that file."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("batch_size: 32\nlr: 0.001\n")
    (tmp_path / "more.yaml").write_text("lr: 0.5\n")
    assert _resolve(tmp_path, "--resume", "auto", "--config", str(tmp_path / "more.yaml")) == 2
    assert (f"lr: 0.5 in {tmp_path / 'more.yaml'} differs from 0.001 in the run being resumed "
            f"({tmp_path / 'run' / 'config.yaml'}); remove it from {tmp_path / 'more.yaml'} to continue the run"
            in capsys.readouterr().err)
    assert _resolve(tmp_path, "--resume", "auto", "--config", str(tmp_path / "more.yaml"), "--lr", "0.7") == 2
    assert "--lr 0.7 differs from 0.001" in capsys.readouterr().err  # a flag over the file: the flag's


def test_a_format_1_mae_run_is_read_as_global_mae():
    """Before windows applied to every method, MAE runs saved LoMaR's `windows: 4` unused."""
    from lomar.checkpoints.kinds import PRETRAIN_FORMAT
    from lomar.checkpoints.reader import saved_settings

    old = {"format": "lomar-pretrain-1", "config": {"method": "mae", "windows": 4}}
    assert saved_settings(old)["windows"] == 0
    assert saved_settings({"config": {"method": "mae", "windows": 4}})["windows"] == 0  # no format: the first
    new = {"format": PRETRAIN_FORMAT, "config": {"method": "mae", "windows": 4}}
    assert saved_settings(new)["windows"] == 4  # mae_window
    assert saved_settings({"format": "lomar-pretrain-1", "config": {"method": "lomar", "windows": 4}})["windows"] == 4


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


def test_file_and_folder_settings_are_recorded_absolute_so_a_run_resumes_from_any_folder(tmp_path, monkeypatch):
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


@pytest.mark.parametrize("layout, expected", [
    ("coco", "val2017"), ("digits", "images/val2017"), ("flat", "annotations"), ("coco+digits", "val2017")])
def test_detect_finds_a_coco_layouts_images_when_none_are_given(tmp_path, layout, expected):
    """Without --val-images or --train-images, detect looks where COCO's and compose-digits' layouts keep the images,
    not in the annotation file's folder alone."""
    from lomar.train.detect_config import DetectConfig, default_image_folder

    ann = tmp_path / "annotations" / "instances_val2017.json"
    ann.parent.mkdir()
    ann.write_text("{}")
    for name in {"coco": ["val2017"], "digits": ["images/val2017"], "flat": ["train2017", "images/train2017"],
                 "coco+digits": ["val2017", "images/val2017"]}[layout]:
        (tmp_path / name).mkdir(parents=True)
    assert default_image_folder(ann) == tmp_path / expected
    assert default_image_folder(tmp_path / "elsewhere" / "instances_val2017.json") == tmp_path / "elsewhere"
    assert default_image_folder(tmp_path / "annotations" / "val2017.json") == tmp_path / "annotations"
    config = DetectConfig(train_ann=str(ann), val_ann=str(ann))
    config.complete({})
    assert config.val_images == config.train_images == str(tmp_path / expected)
    config = DetectConfig(val_ann=str(ann), val_images=str(tmp_path))
    config.complete({"val_images": str(tmp_path)})
    assert config.val_images == str(tmp_path)  # a given folder is kept


@pytest.mark.parametrize("flags, message", [
    (["--method", "lomar", "--decoder-depth", "4"], "--decoder-depth 4 is for --method mae only (got --method lomar)"),
    (["--method", "beit", "--decoder-embed-dim", "64"], "--decoder-embed-dim 64 is for --method mae only"),
    (["--method", "beit", "--no-norm-pix-loss"], "--no-norm-pix-loss is for --method lomar and mae only"),
    (["--method", "mae", "--layer-scale-init", "0.1"], "--layer-scale-init 0.1 is for --method beit only"),
])
def test_a_setting_the_run_would_not_read_is_refused(tmp_path, capsys, flags, message):
    """Each would otherwise run ignored without a word (MAE's decoder under LoMaR, say)."""
    assert _resolve(tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "drop it" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flags, method", [(["--method", "mae", "--window-size", "5"], "mae"),
                                           (["--windows", "global", "--window-size", "5"], "lomar")])
def test_a_window_size_without_windows_is_noted(tmp_path, capsys, flags, method):
    """A sweep over --windows keeps its window size: noted (once the settings are valid), not refused."""
    assert _resolve(tmp_path, *flags) == 0
    assert capsys.readouterr().err == (f"lomar pretrain: note: --window-size 5 is unused: this --method {method} run "
                                       f"has no windows (--windows 0: the whole image)\n")
    assert _resolve(tmp_path, *flags, "--crop-scale", "0.9", "0.1") == 2
    assert capsys.readouterr().err.count("\n") == 1  # an invalid run gets its one-line error alone


@pytest.mark.parametrize("flags", [["--method", "mae", "--decoder-depth", "4"],
                                   ["--method", "lomar", "--no-norm-pix-loss"],
                                   ["--method", "mae", "--window-size", "5", "--windows", "4"],
                                   ["--method", "beit", "--decoder-depth", "8"]])  # its default, as config.yaml has
def test_settings_the_run_reads_are_accepted(tmp_path, capsys, flags):
    assert _resolve(tmp_path, *flags) == 0
    assert capsys.readouterr().err == ""


def test_a_runs_own_config_yaml_passes_the_unread_settings_check(tmp_path, capsys):
    for method in ("lomar", "mae", "beit"):
        assert _resolve(tmp_path, "--method", method) == 0
        config = _yaml(tmp_path, capsys.readouterr().out)
        assert main(["pretrain", "--config", config, "--out", str(tmp_path / method), "--print-config"]) == 0, method
        capsys.readouterr()


def test_a_refused_recipe_default_is_named_as_the_recipes(tmp_path, capsys):
    """BEiT's recipe jitters colour, which --decode draft cannot: the refusal named a --color-jitter never typed."""
    assert _resolve(tmp_path, "--method", "beit", "--decode", "draft") == 2
    assert "--color-jitter 0.4 (--method beit's recipe) is applied by --decode full only" in capsys.readouterr().err
    assert _resolve(tmp_path, "--method", "beit", "--decode", "draft", "--color-jitter", "0.3") == 2
    assert "--color-jitter 0.3 is applied by" in capsys.readouterr().err


def test_a_saved_setting_nested_thousands_deep_is_quoted_briefly_not_a_recursion_error():
    from lomar.train.config import PretrainConfig
    from lomar.train.settings import ConfigError, coerce_all

    deep: list = []
    for _ in range(50_000):  # what a crafted checkpoint's pickled settings can hold (its unpickler does not recurse)
        deep = [deep]
    with pytest.raises(ConfigError, match=r"^seed: \[\[\[\[\.\.\.\]\]\]\] in crafted.pt must be a number$"):
        coerce_all(PretrainConfig, {"seed": deep}, "crafted.pt", strict=False)
    with pytest.raises(ConfigError, match=r"^data: \['x+\.\.\.x+'\] in crafted.pt must be a string$") as error:
        coerce_all(PretrainConfig, {"data": ["x" * 10**6]}, "crafted.pt", strict=False)
    assert len(str(error.value)) < 300  # a line, not a megabyte


def test_a_megabyte_value_from_a_crafted_checkpoint_is_quoted_in_a_line(tmp_path):
    import torch

    from lomar.train.run_state import read_meta
    from lomar.train.settings import ConfigError, Setting

    with pytest.raises(ConfigError, match=r"^--method must be one of a, b, got 'x+\.\.\.x+'$") as error:
        Setting("a", "the method", choices=("a", "b")).check("method", "x" * 10**6)  # a saved method resumed
    assert len(str(error.value)) < 300
    torch.save({"step": "x" * 10**6}, tmp_path / "crafted.pt")
    with pytest.raises(ValueError, match=r"holds \{'step': 'x+\.\.\.x+'\}, not counts of steps") as error:
        read_meta(tmp_path / "crafted.pt")
    assert len(str(error.value)) < 500


def test_a_knn_data_from_the_settings_file_without_knn_every_is_named_as_its_line(tmp_path, capsys):
    """knn_data in --config with --knn-every 0 given: the refusal said 'drop --knn-data', a flag the user never gave."""
    (tmp_path / "knn" / "train").mkdir(parents=True)
    (tmp_path / "knn" / "val").mkdir()
    config = _yaml(tmp_path, f"knn_data: {tmp_path / 'knn'}\nknn_every: 2\n")
    assert _resolve(tmp_path, "--config", config, "--knn-every", "0") == 2
    assert capsys.readouterr().err.endswith(f"error: knn_data: {tmp_path / 'knn'} in {config} is used only with "
                                            f"--knn-every N (a k-NN evaluation every N epochs); add --knn-every 1, "
                                            f"or drop knn_data from {config}\n")


@pytest.mark.parametrize("config", [FinetuneConfig, DetectConfig, SegmentConfig])
def test_each_training_commands_out_help_names_the_files_a_run_leaves(config):
    """segment's --out help named last.pt and not the best.pt its run keeps (and --eval-only reads first), and
    finetune's no config.yaml, where detect's named both."""
    said = declarations(config)["out"].help
    assert all(name in said for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl")), said
