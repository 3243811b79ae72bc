"""Checks across a training command's settings (lomar.train.config_checks)."""

from __future__ import annotations

import pytest

from lomar.cli.app import main


@pytest.mark.parametrize("command, flags, yaml, given", [
    ("finetune", ["--mixup", "0.5", "--no-train-pos-embed"], "mixup: 0.5\ntrain_pos_embed: false\n",
     "--no-train-pos-embed, --mixup 0.5 are training settings"),
    ("detect", ["--rois-per-image", "4"], "rois_per_image: 4\n", "--rois-per-image 4 is a training setting"),
    ("segment", ["--max-steps", "3"], "max_steps: 3\n", "--max-steps 3 is a training setting"),
])
def test_eval_only_refuses_the_training_flags_it_would_leave_unread(tmp_path, capsys, command, flags, yaml, given):
    """--eval-only scored the model as if --mixup, --max-steps, --rois-per-image ... were not given; the same settings
    in a --config file (a run's own config.yaml) pass this check (the missing --pretrained is the error then)."""
    scored = ["--eval-only", "--pretrained", str(tmp_path / "missing"), "--out", str(tmp_path / "scores")]
    assert main([command, *scored, *flags]) == 2
    assert capsys.readouterr().err == (f"lomar {command}: error: {given}, and --eval-only trains nothing; drop "
                                       f"{'them' if ' are ' in given else 'it'}, or drop --eval-only to train\n")
    (tmp_path / "run.yaml").write_text(yaml)
    assert main([command, *scored, "--config", str(tmp_path / "run.yaml")]) == 2
    assert "training setting" not in capsys.readouterr().err
    assert not (tmp_path / "scores").exists()
