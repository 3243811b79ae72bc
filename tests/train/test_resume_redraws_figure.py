"""A pretraining run killed between a checkpoint and its reconstruction figures: the resume draws them, so the run
folder holds the figures an uninterrupted run's does; a rewind to an earlier checkpoint shows that checkpoint's."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from helpers import pretrain
from lomar.methods import get_method
from lomar.train.pretrain import PretrainTask
from lomar.viz.curves import loss_curve
from lomar.viz.reconstruction import snapshot_path


def test_a_resume_draws_the_figure_its_checkpoint_lacks(tmp_path, image_dir):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--epochs", "1", "--max-steps", "2",
                    "--figure-images", "1") == 0
    figure = out / "reconstruction-000002.png"
    drawn = figure.read_bytes()
    figure.unlink()  # the kill: last.pt at step 2 written, its figure not
    assert pretrain("--data", str(image_dir), "--out", str(out), "--epochs", "1", "--resume", "auto") == 0
    assert sorted(p.name for p in out.glob("reconstruction-*.png")) == [
        "reconstruction-000000.png", "reconstruction-000002.png", "reconstruction-000004.png"]
    assert figure.read_bytes() == drawn


def _resume_a_cut_end(out, image_dir, cut) -> None:
    """A two-step run to its end; ``cut(out)`` leaves what a kill during that end's writes left, with the export
    (written last) missing; then the resume at the end."""
    args = ("--data", str(image_dir), "--out", str(out), "--epochs", "1", "--max-steps", "2", "--figure-images", "1")
    assert pretrain(*args) == 0
    cut(out)
    for name in ("encoder.safetensors", "config.json"):
        (out / name).unlink()
    assert pretrain(*args, "--resume", "auto") == 0
    assert (out / "encoder.safetensors").is_file()


def test_a_resume_at_the_end_draws_the_last_checkpoints_missing_figure(tmp_path, image_dir):
    figure, drawn = tmp_path / "reconstruction-000002.png", []

    def cut(out):  # killed between the last checkpoint and its figure
        drawn.append(figure.read_bytes())
        figure.unlink()

    _resume_a_cut_end(tmp_path, image_dir, cut)
    assert figure.read_bytes() == drawn[0] == (tmp_path / "reconstruction.png").read_bytes()


def test_a_resume_at_the_end_redraws_a_loss_curve_its_cut_end_left_behind(tmp_path, image_dir):
    curve, drawn = tmp_path / "loss.png", []

    def cut(out):  # killed while the last checkpoint's loss.png was drawn: an earlier checkpoint's stays
        drawn.append(curve.read_bytes())
        curve.write_bytes((out / "reconstruction-000000.png").read_bytes())

    _resume_a_cut_end(tmp_path, image_dir, cut)
    assert curve.read_bytes() == drawn[0]


def test_a_resume_at_the_end_copies_the_latest_figure_its_cut_end_left_a_step_old(tmp_path, image_dir):
    def cut(out):  # killed between the last checkpoint's reconstruction-000002.png and its reconstruction.png copy
        (out / "reconstruction.png").write_bytes((out / "reconstruction-000000.png").read_bytes())

    _resume_a_cut_end(tmp_path, image_dir, cut)
    assert (tmp_path / "reconstruction.png").read_bytes() == (tmp_path / "reconstruction-000002.png").read_bytes()


def test_a_rewind_shows_the_figures_of_the_checkpoint_it_resumes_from(tmp_path, image_dir, monkeypatch):
    out, expected = tmp_path / "run", tmp_path / "loss-to-step-4.png"
    args = ("--data", str(image_dir), "--out", str(out), "--figure-images", "1", "--save-every", "1", "--epochs", "2")
    assert pretrain(*args) == 0  # 4 steps an epoch: figures at steps 0, 4 and 8
    dropped = (out / "loss.png").read_bytes()

    def stopped(task, batch):  # the rewound run stopped at its first step: the figures are what begin() left
        raise _Stopped

    monkeypatch.setattr(PretrainTask, "loss", stopped)
    with pytest.raises(_Stopped):
        pretrain(*args, "--resume", str(out / "checkpoint-000004.pt"), "--overwrite")
    assert not (out / "reconstruction-000008.png").exists()
    assert (out / "reconstruction.png").read_bytes() == (out / "reconstruction-000004.png").read_bytes()
    loss_curve(out / "metrics.jsonl", expected, "lomar training loss", get_method("lomar").loss_name)  # 4 steps logged
    assert (out / "loss.png").read_bytes() == expected.read_bytes() != dropped


class _Stopped(Exception):
    """What stops the rewound run in its first step."""


@pytest.mark.parametrize("figures", [(4,), ()], ids=["one-at-a-stop-before", "none-before"])
def test_a_sharded_rewind_to_a_step_without_a_figure_shows_none_of_a_dropped_step(tmp_path, figures):
    """A sharded run draws figures only when it stops or ends; rewound to step 6 from its end at 8, whose numbered
    figure the rewind removed, reconstruction.png is the figure of its stop at 4, or none where it never stopped."""
    for step in figures:
        snapshot_path(tmp_path, step).write_bytes(f"figure of step {step}".encode())
    (tmp_path / "reconstruction.png").write_bytes(b"figure of the dropped step 8")
    drawn = []
    task = SimpleNamespace(config=SimpleNamespace(out=str(tmp_path)), progress=SimpleNamespace(step=6), sharded=True,
                           figure=lambda: None, draw_curves=lambda config, out: drawn.append(out),
                           _drawing=lambda what: contextlib.nullcontext())
    PretrainTask._settle_figures(task)
    latest = tmp_path / "reconstruction.png"
    assert (latest.read_bytes() == b"figure of step 4") if figures else not latest.exists()
    assert drawn == [tmp_path]  # loss.png, from the log cut back to step 6
