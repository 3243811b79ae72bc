"""The configuration of what a run reads: --data shard patterns and folders, detect's COCO image folders found, and
--resume (a path that cannot be resumed, auto before the first checkpoint, the run's own settings kept, an older
format read).

Everything here stops at --print-config or a ConfigError: no training."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import yaml
from config_cli import _resolve, _yaml


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
