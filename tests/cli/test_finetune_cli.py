"""`lomar finetune` as a command: settings validated before any folder exists, YAML and
--print-config, resume rules, exact resume, the run-folder lock."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from helpers import fill_disk
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main


@pytest.fixture(scope="module")
def folder(labelled_folder) -> Path:
    return labelled_folder


def _args(pretrained: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--pretrained", str(pretrained), "--data", str(folder), "--img-size", "32",
            "--batch-size", "4", "--workers", "0", "--threads", "1", "--device", "cpu", "--log-every", "1",
            "--out", str(out), *extra]


@pytest.mark.parametrize("flags, message", [
    (["--blr", "nan"], "--blr must be a finite number"),
    (["--blr", "-1"], "--blr must be >= 0"),  # one declaration with pretrain's; 0 is "must be positive"
    (["--blr", "0"], "--blr must be positive"),
    (["--aa", "bogus"], "--aa 'bogus' is not a timm auto-augment policy"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--drop-path", "2"], "--drop-path must be in [0, 1)"),
    (["--reprob", "2"], "--reprob must be a probability"),
    (["--smoothing", "2"], "--smoothing must be in [0, 1)"),
    (["--mixup", "-1"], "--mixup must be >= 0"),
    (["--warmup-epochs", "10", "--epochs", "1"], "--warmup-epochs must be in [0, --epochs 1]"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--workers", "-2"], "--workers must be >= 0"),
    (["--crop-scale", "0.6", "0.5"], "--crop-scale must be LOW HIGH with 0 < LOW <= HIGH <= 1"),
    (["--crop-scale", "0", "1"], "--crop-scale must be LOW HIGH with 0 < LOW <= HIGH <= 1"),
    (["--crop-scale", "0.5", "1.5"], "--crop-scale must be LOW HIGH with 0 < LOW <= HIGH <= 1"),
    (["--crop-scale", "nan", "1"], "--crop-scale must be LOW HIGH with 0 < LOW <= HIGH <= 1"),
    (["--crop-scale", "0.5", "inf"], "--crop-scale must be LOW HIGH with 0 < LOW <= HIGH <= 1"),
    (["--crop-scale", "0.5"], "--crop-scale: expected 2 arguments"),
    (["--crop-scale", "half", "1"], "--crop-scale: invalid float value: 'half'"),
    (["--out", "file"], "is a file"),
    (["--out", "under a file"], "which is a file"),
    (["--resume", "auto", "--out", None], "--resume auto needs --out"),
    (["--attention", "flex", "--device", "cpu"], "--attention flex needs a CUDA device to train, not --device cpu"),
])
def test_bad_invocations_are_one_line_and_create_no_folder(tmp_path, capsys, pretrained, folder, flags, message):
    out = tmp_path / "ft"
    flags = list(flags)
    args = _args(pretrained, folder, out)
    if "--out" in flags:
        i = flags.index("--out")
        target = flags[i + 1]
        del flags[i:i + 2]
        args = args[:-2]
        if target is not None:
            afile = tmp_path / "afile"
            afile.write_text("not a folder")
            flags += ["--out", str(afile if target == "file" else afile / "sub")]
    before = set(tmp_path.iterdir())
    code = main([*args, *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert {p for p in tmp_path.iterdir() if p.name != "afile"} == {p for p in before if p.name != "afile"}
    assert not Path("runs").exists()


def test_yaml_settings_flags_win_and_print_config(tmp_path, capsys, pretrained, folder):
    config = tmp_path / "ft.yaml"
    config.write_text("blr: 1e-3\nlayer-decay: 0.75\nmixup: 0\nepochs: 7\n")
    out = tmp_path / "ft"
    assert main([*_args(pretrained, folder, out), "--config", str(config), "--epochs", "3", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["blr"] == 1e-3 and resolved["layer_decay"] == 0.75 and resolved["mixup"] == 0.0
    assert resolved["epochs"] == 3 and resolved["smoothing"] == 0.1 and resolved["aa"] == "rand-m9-mstd0.5-inc1"
    assert not out.exists()
    config.write_text("blr: 1e-3\nbatch_szie: 8\n")
    assert main([*_args(pretrained, folder, out), "--config", str(config)]) == 2
    assert "batch_szie" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ("crop_scale: 0.5", "crop_scale: 0.5 in {config} must be a list of 2 numbers, e.g. crop_scale: [0.08, 1.0]"),
    ("crop_scale: [0.5, 1, 1]", "must be a list of 2 numbers"),
    ("crop_scale: [half, 1]", "must be a list of 2 numbers"),
    ("crop_scale: [0.9, 0.5]", "--crop-scale must be LOW HIGH with 0 < LOW <= HIGH <= 1"),
    ("window_size: 2\nglobal_blocks: 1", "global_blocks: 1 in {config} must be a list of numbers"),
    ("window_size: 2\nglobal_blocks: [1, two]", "must be a list of numbers"),
])
def test_bad_yaml_crop_scale_is_one_line(tmp_path, capsys, pretrained, folder, line, message):
    config = tmp_path / "ft.yaml"
    config.write_text(line + "\n")
    assert main([*_args(pretrained, folder, tmp_path / "ft"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message.format(config=config) in err and err.count("\n") == 1 and not (tmp_path / "ft").exists()


def test_crop_scale_yaml_round_trip(tmp_path, capsys, pretrained, folder):
    config, again = tmp_path / "ft.yaml", tmp_path / "again.yaml"
    config.write_text("crop-scale: [5e-1, 1]\n")  # YAML 1.1 reads 5e-1 as a string
    out = tmp_path / "ft"
    assert main([*_args(pretrained, folder, out), "--config", str(config), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["crop_scale"] == [0.5, 1.0]
    again.write_text(printed)  # the printed config is itself a valid config file
    assert main([*_args(pretrained, folder, out), "--config", str(again), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(printed)
    assert main([*_args(pretrained, folder, out), "--config", str(again), "--crop-scale", "0.25", "1",
                 "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["crop_scale"] == [0.25, 1.0]  # the flag wins


def test_global_blocks_take_any_number_of_values(tmp_path, capsys, pretrained, folder):
    config = tmp_path / "ft.yaml"
    config.write_text("window_size: 2\nglobal_blocks: [0, 1]\n")
    out = tmp_path / "ft"
    assert main([*_args(pretrained, folder, out), "--config", str(config), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["global_blocks"] == [0, 1]
    assert main([*_args(pretrained, folder, out), "--window-size", "2", "--global-blocks", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["global_blocks"] == []  # every block windowed


def test_resumed_finetune_equals_an_uninterrupted_one(tmp_path, capsys, pretrained, folder):
    # 8 training images, batch 4: 2 steps per epoch; the break at step 3 is mid-epoch 1.
    # The default recipe: RandAugment, random erasing, mixup/cutmix, label smoothing, drop path.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*_args(pretrained, folder, straight), "--epochs", "3", "--max-steps", "5"]) == 0
    assert main([*_args(pretrained, folder, resumed), "--epochs", "3", "--max-steps", "3"]) == 0
    assert safe_load(resumed / "last.pt")["step"] == 3
    # the resume names only the folder and the stop: every other setting comes from the checkpoint
    assert main(["finetune", "--out", str(resumed), "--resume", "auto", "--max-steps", "5"]) == 0
    a, b = safe_load(straight / "last.pt"), safe_load(resumed / "last.pt")
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (5, 2)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)

    def losses(out):
        return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(straight) == losses(resumed) and len(losses(resumed)) == 5
    capsys.readouterr()
    code = main(["finetune", "--out", str(resumed), "--resume", "auto", "--blr", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--blr 1.0 differs from 0.0005" in err and err.count("\n") == 1


def test_finetune_refuses_a_locked_folder_and_an_older_resume(tmp_path, capsys, pretrained, folder):
    from lomar.train.run_lock import RunLock

    out = tmp_path / "ft"
    assert main([*_args(pretrained, folder, out), "--epochs", "2"]) == 0
    capsys.readouterr()
    with RunLock(out):
        assert main([*_args(pretrained, folder, out), "--epochs", "3", "--resume", "auto"]) == 2
        assert "in use by another run" in capsys.readouterr().err
    older = tmp_path / "older.pt"
    ckpt = safe_load(out / "last.pt")
    torch.save({**ckpt, "step": 1, "epoch": 0, "batches_done": 1}, older)
    assert main(["finetune", "--resume", str(older), "--out", str(out), "--epochs", "3"]) == 2
    err = capsys.readouterr().err  # a copy outside the run: --overwrite would replace the run, not rewind it
    assert "is another folder's checkpoint" in err and "its log kept up to step 1" in err and err.count("\n") == 1
    assert safe_load(out / "last.pt")["step"] == 4


def test_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, capsys, pretrained, folder, monkeypatch):
    out = tmp_path / "ft"
    assert main([*_args(pretrained, folder, out), "--epochs", "2", "--max-steps", "1"]) == 0
    before = (out / "last.pt").read_bytes()

    fill_disk(monkeypatch)  # torch.save's zip writer meets ENOSPC part-way, as on a real disk
    capsys.readouterr()
    assert main([*_args(pretrained, folder, out), "--epochs", "2", "--max-steps", "2", "--resume", "auto"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "warning:" not in line]  # the short warm-up's
    assert len(err) == 1 and "no space left" in err[0] and "last.pt is intact" in err[0]
    monkeypatch.undo()
    assert (out / "last.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_one_class_is_refused_by_finetune_and_the_probes(tmp_path, capsys, pretrained, folder):
    """With one class every score is 100 %: there is nothing to classify."""
    single = tmp_path / "single"
    for split in ("train", "val"):
        first = sorted(p for p in (folder / split).iterdir() if p.is_dir())[0]
        shutil.copytree(first, single / split / first.name)
    for command in (_args(pretrained, single, tmp_path / "ft"),
                    ["knn", str(pretrained), "--data", str(single), "--workers", "0", "--img-size", "32"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "holds one class folder" in err and "a classifier needs at least two" in err and err.count("\n") == 1
    assert not (tmp_path / "ft").exists()
