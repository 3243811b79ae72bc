"""Checks across a training command's settings (lomar.train.config_checks)."""

from __future__ import annotations

import pytest
from test_config import _resolve, _yaml

from lomar.cli.app import main


@pytest.mark.parametrize("command, flags, yaml, given", [
    ("finetune", ["--mixup", "0.5", "--no-train-pos-embed"], "mixup: 0.5\ntrain_pos_embed: false\n",
     "--no-train-pos-embed, --mixup 0.5 are training settings"),
    ("detect", ["--rois-per-image", "4"], None, "--rois-per-image 4 is a training setting"),
    ("detect", ["--drop-path", "0.2"], None, "--drop-path 0.2 is a training setting"),
    ("segment", ["--max-steps", "3"], "max_steps: 3\n", "--max-steps 3 is a training setting"),
    # detect and segment evaluate in fp32 whatever the precision: only training's autocast reads it
    ("detect", ["--precision", "bf16"], None, "--precision bf16 is a training setting"),
    ("segment", ["--precision", "bf16"], "precision: bf16\n", "--precision bf16 is a training setting"),
])
def test_eval_only_refuses_the_training_flags_it_would_leave_unread(tmp_path, capsys, command, flags, yaml, given):
    """--eval-only scored the model as if --mixup, --max-steps, --rois-per-image ... were not given; the same settings
    in a --config file (a run's own config.yaml) pass this check (the missing --pretrained is the error then)."""
    scored = ["--eval-only", "--pretrained", str(tmp_path / "missing"), "--out", str(tmp_path / "scores")]
    assert main([command, *scored, *flags]) == 2
    assert capsys.readouterr().err == (f"lomar {command}: error: {given}, and --eval-only trains nothing; drop "
                                       f"{'them' if ' are ' in given else 'it'}, or drop --eval-only to train\n")
    if yaml is not None:  # one helper for the three: detect's next checks read a checkpoint format's imports (slow)
        assert main([command, *scored, "--config", _yaml(tmp_path, yaml)]) == 2
        assert "training setting" not in capsys.readouterr().err
    assert not (tmp_path / "scores").exists()


def test_a_knn_decode_without_knn_evaluations_is_refused(tmp_path, capsys):
    """--knn-decode without --knn-every: the run went on without a word."""
    assert _resolve(tmp_path, "--knn-decode", "draft") == 2
    assert capsys.readouterr().err == ("lomar pretrain: error: --knn-decode draft decodes --knn-every's k-NN images, "
                                       "but this run has no k-NN evaluation; add --knn-every 1 --knn-data ROOT, or "
                                       "drop --knn-decode\n")


def test_a_runs_config_yaml_with_its_resolved_knn_decode_still_runs(tmp_path, capsys):
    assert _resolve(tmp_path, "--config", _yaml(tmp_path, "knn_every: 0\nknn_decode: full\n")) == 0
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("args, note", [
    (["--windows", "0", "--window-placement", "distinct"],
     "--window-placement distinct is unused: this --method lomar run has no windows (--windows 0: the whole image)"),
    (["--decode-ahead", "0", "--decode", "draft"],
     "--decode-ahead 0 is unused: it decodes --decode gpu's batches ahead, and this run is --decode draft"),
])
def test_a_setting_that_the_run_leaves_unread_is_said_to_be(tmp_path, capsys, args, note):
    """A sweep may keep them (benchmarks/gpu_check.sh's draft-inline runs --decode draft --decode-ahead 0): a note."""
    assert _resolve(tmp_path, *args) == 0
    assert capsys.readouterr().err == f"lomar pretrain: note: {note}\n"


def test_an_eval_stride_with_whole_image_evaluation_is_refused(tmp_path, capsys):
    """--eval-mode whole scored the whole image and left a given --eval-stride unread."""
    assert main(["segment", "--num-classes", "3", "--eval-mode", "whole", "--eval-stride", "8", "--img-size", "32",
                 "--out", str(tmp_path / "run"), "--print-config"]) == 2
    assert capsys.readouterr().err == ("lomar segment: error: --eval-stride 8 moves --eval-mode slide's windows, but "
                                       "this evaluation is --eval-mode whole; drop it, or use --eval-mode slide\n")


def test_eval_only_of_a_probe_file_names_the_predict_command_that_runs_it_pasteable(tmp_path):
    """A `lomar linprobe --save` file in a folder with a space: the `lomar predict` it names reads as one path."""
    from types import SimpleNamespace

    import torch

    from lomar.checkpoints.kinds import LINPROBE_FORMAT
    from lomar.train.config_checks import check_eval_only_model
    from lomar.train.settings import ConfigError

    probe = tmp_path / "my probes" / "probe.pt"
    probe.parent.mkdir()
    torch.save({"format": LINPROBE_FORMAT}, probe)
    config = SimpleNamespace(pretrained=str(probe), COMMAND="finetune", resume=None)
    with pytest.raises(ConfigError, match="not a `lomar finetune` run or checkpoint") as refused:
        check_eval_only_model(config, None, "classifier")
    assert f"`lomar predict '{probe}' IMAGES` runs it on images" in str(refused.value)
