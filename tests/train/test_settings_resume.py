"""What every training command's settings and its --resume read, and refuse, before any work: the settings' resolution
and checks (lomar.train.task_config's TaskConfig), which checkpoint --resume names and what a resume may change
(lomar.train.settings_resume), --eval-only's model (lomar.train.config_checks)."""

from __future__ import annotations

import pytest

from lomar.cli.app import main


@pytest.mark.parametrize("command, saved", [
    ("finetune", {"classes": ["a", "b"], "format": "lomar-finetune-1"}),
    ("detect", {"format": "lomar-detect-1", "settings": {}}),
    ("segment", {"task": "segment", "settings": {"num_classes": 3}}),
])
def test_resuming_best_pt_names_what_resumes_the_run_and_what_takes_the_model(tmp_path, capsys, command, saved):
    """best.pt is the command's own file without the run's state: the refusal says so, names last.pt where there is
    one, and what takes the model (--eval-only; --pretrained where the command trains from its own). Detect said
    'is not a `lomar detect` checkpoint' and segment failed after building the run ('optimizer')."""
    from lomar.checkpoints.io import atomic_save  # torch: this test alone needs it

    atomic_save({"model": {}, "epoch": 3, "step": 9, "metrics": {}, **saved}, tmp_path / "best.pt")
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    for with_last in (False, True):
        if with_last:
            last.write_bytes(b"")  # named only where it is
        assert main([command, "--resume", str(best)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        uses = ([f"continue its run with --resume {last}"] if with_last else []) + (
            [] if command == "segment" else [f"start a new run from it with --pretrained {best}"]) + [
            f"score it with --eval-only --pretrained {best}"]
        assert line == (f"lomar {command}: error: --resume {best} holds a `lomar {command}` model without its run's "
                        f"state (optimizer, step, RNG: best.pt keeps the best evaluation's weights alone); "
                        + ", or ".join(uses))


@pytest.mark.parametrize("command", ["finetune", "detect", "segment"])
def test_eval_only_continues_no_run(tmp_path, capsys, command):
    """--eval-only with --resume was read as a resume (detect and segment: the run's settings against this
    invocation's, its folder as --out): refused first, in one line."""
    assert main([command, "--eval-only", "--pretrained", str(tmp_path / "run"), "--resume", "auto",
                 "--out", str(tmp_path / "scores")]) == 2
    assert capsys.readouterr().err == (f"lomar {command}: error: --eval-only scores --pretrained and continues no "
                                       f"run; drop --resume auto\n")
    assert not (tmp_path / "scores").exists()


def test_out_inside_any_folder_the_run_reads_is_refused(tmp_path, capsys):
    """--out inside --val (not --data): the run's folder showed up as an empty class of the folder it scores."""
    from PIL import Image

    for split in ("data/train/a", "held-out/a"):
        (tmp_path / split).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / split / "x.png")
    (tmp_path / "encoder.pt").write_bytes(b"")
    out = tmp_path / "held-out" / "scored"
    assert main(["finetune", "--pretrained", str(tmp_path / "encoder.pt"), "--data", str(tmp_path / "data"),
                 "--val", str(tmp_path / "held-out"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"lomar finetune: error: --out {out} is inside --val {tmp_path / 'held-out'}: "
                                       f"the run's files would join the data it reads; put the run elsewhere\n")
    assert not out.exists()


@pytest.mark.parametrize("command, model, extra", [("finetune", "classifier", ["--val", "val"]),
                                                   ("detect", "detector", ["--val-ann", "val.json"]),
                                                   ("segment", "segmenter", ["--data", "ade"])])
def test_eval_only_scores_only_the_commands_own_model(tmp_path, capsys, monkeypatch, command, model, extra):
    """One check for the three: --eval-only's --pretrained is given, there, and the command's own run or checkpoint
    (detect refused an encoder only after reading its COCO files)."""
    from lomar.checkpoints.io import atomic_save  # torch: this test alone needs it

    monkeypatch.chdir(tmp_path)
    atomic_save({"model": {}}, tmp_path / "encoder.pt")
    for pretrained, message in [([], f"--eval-only needs --pretrained RUN (a `lomar {command}` run folder or "
                                     f"checkpoint)"),
                                (["--pretrained", "missing.pt"],
                                 f"--pretrained {tmp_path / 'missing.pt'} does not exist"),
                                (["--pretrained", str(tmp_path / "encoder.pt")],
                                 f"--pretrained {tmp_path / 'encoder.pt'} is not a `lomar {command}` run or "
                                 f"checkpoint; --eval-only scores a trained {model}")]:
        assert main([command, "--eval-only", *pretrained, *extra, "--out", "scores"]) == 2
        assert capsys.readouterr().err == f"lomar {command}: error: {message}\n"
    assert not (tmp_path / "scores").exists()


def test_a_resume_may_give_another_time_limit_or_none_and_keeps_the_runs_otherwise():
    """A resumed job gets a slot of its own: its limit is run control, not the run's."""
    from lomar.train.config import PretrainConfig
    from lomar.train.settings_resume import resume_values

    saved = {"time_limit": 3600}
    assert resume_values(PretrainConfig, saved, "last.pt", {"time_limit": 60})["time_limit"] == 60
    assert resume_values(PretrainConfig, saved, "last.pt", {"time_limit": None})["time_limit"] is None
    assert resume_values(PretrainConfig, saved, "last.pt", {})["time_limit"] == 3600


@pytest.mark.parametrize("command", ["pretrain", "finetune", "detect", "segment"])
def test_a_time_limit_in_a_form_not_taken_is_refused_in_one_line(tmp_path, capsys, command):
    assert main([command, "--time-limit", "10:00"]) == 2
    assert capsys.readouterr().err.strip().endswith("'10:00' is not a duration; write seconds (5400), 90m, 1.5h, "
                                                    "2d, 1h30m, or HH:MM:SS / D-HH:MM:SS (01:30:00, 1-12:00:00) (see "
                                                    f"lomar {command} --help)")
    (tmp_path / "c.yaml").write_text("time_limit: 2 hours\n")
    assert main([command, "--config", str(tmp_path / "c.yaml")]) == 2
    assert "time_limit: '2 hours' in " in capsys.readouterr().err


def test_a_resume_may_switch_the_precision_and_auto_given_again_keeps_the_runs():
    """Autocast's dtype is no part of the weights or the optimizer state: a run may go on in another precision (the
    lifecycle says so in one line); 'auto' stays 'auto', which resolves to the precision the checkpoint records."""
    from lomar.train.config import PretrainConfig
    from lomar.train.settings_resume import resume_values

    for saved in ("auto", "bf16"):
        assert resume_values(PretrainConfig, {"precision": saved}, "last.pt", {"precision": "fp32"})["precision"] == \
            "fp32"
        assert resume_values(PretrainConfig, {"precision": saved}, "last.pt", {})["precision"] == saved
    assert resume_values(PretrainConfig, {"precision": "auto"}, "last.pt", {"precision": "auto"})["precision"] == "auto"
