"""`lomar pretrain`'s configuration as a command reads and records it: config.yaml and --config, recipe defaults,
--out holding another run (locked, rewound, resumed), and the warm-up a --max-steps or --schedule-steps run gets."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from helpers import TINY, losses, pretrain
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main


def test_the_start_line_counts_one_image_and_one_window_in_the_singular(tmp_path, capsys, image_dir, no_run_figures):
    data = tmp_path / "one"
    data.mkdir()
    shutil.copy(next(image_dir.iterdir()), data)
    i = TINY.index("--windows")
    assert main(["pretrain", *TINY[:i], *TINY[i + 2:], "--windows", "1", "--batch-size", "1", "--max-steps", "1",
                 "--data", str(data), "--out", str(tmp_path / "run")]) == 0
    assert f"; 1 image in {data}; " in (out := capsys.readouterr().out) and ", 1 window of 3x3 patches, " in out, out


def test_config_yaml_records_neither_overwrite_nor_resume(tmp_path, capsys, image_dir, no_run_figures):
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


def test_out_holding_another_run_needs_resume_or_overwrite(tmp_path, capsys, image_dir, no_run_figures):
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


def test_bare_resume_means_auto(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--resume", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["resume"] == "auto"


def test_a_locked_run_folder_refuses_a_second_run(tmp_path, capsys, image_dir, no_run_figures):
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


def test_a_resume_that_cuts_the_epochs_below_the_warm_up_says_what_it_can_do(tmp_path, capsys, image_dir,
                                                                             no_run_figures):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--epochs", "4", "--warmup-epochs", "2",
                    "--max-steps", "1") == 0
    capsys.readouterr()
    assert main(["pretrain", "--out", str(out), "--resume", "auto", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "a resumed run keeps its warm-up: pass --epochs 2 or more, and --max-steps N to stop sooner" in err


def test_resume_never_rewinds_a_folder_with_newer_state(tmp_path, capsys, image_dir, no_run_figures):
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


def test_resume_auto_without_last_pt_uses_the_newest_intact_checkpoint(tmp_path, capsys, image_dir, no_run_figures):
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


def test_max_steps_without_epochs_warms_up_to_the_peak_within_the_run(tmp_path, capsys, image_dir, no_run_figures):
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


def test_max_steps_inside_an_explicit_warmup_warns_up_front(tmp_path, capsys, image_dir, no_run_figures):
    flags = _without(TINY, "--warmup-epochs", "--lr")
    out = tmp_path / "run"
    assert main(["pretrain", *flags, "--data", str(image_dir), "--out", str(out), "--max-steps", "2",
                 "--warmup-epochs", "2"]) == 0
    printed = capsys.readouterr()  # a warning goes to stderr, as every warning and note does
    assert "warning: this run stops at step 2, inside its 8-step warm-up" in printed.err
    assert "drop --epochs" in printed.err
    assert "warning" not in printed.out


def test_a_warm_up_that_schedule_steps_set_is_not_blamed_on_epochs(tmp_path, capsys, image_dir, no_run_figures):
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
