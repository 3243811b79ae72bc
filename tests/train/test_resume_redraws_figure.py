"""A pretraining run killed between a checkpoint and its reconstruction figure: the resume draws that figure, so the
run folder holds the figures an uninterrupted run's does."""

from __future__ import annotations

from helpers import pretrain


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


def test_a_resume_at_the_end_draws_the_last_checkpoints_missing_figure(tmp_path, image_dir):
    out = tmp_path / "run"
    args = ("--data", str(image_dir), "--epochs", "1", "--max-steps", "2", "--figure-images", "1")
    assert pretrain(*args, "--out", str(out)) == 0
    figure = out / "reconstruction-000002.png"
    drawn = figure.read_bytes()
    for name in (figure.name, "encoder.safetensors", "config.json"):  # the kill: the last last.pt written, no more
        (out / name).unlink()
    assert pretrain(*args, "--out", str(out), "--resume", "auto") == 0
    assert figure.read_bytes() == drawn == (out / "reconstruction.png").read_bytes()
    assert (out / "encoder.safetensors").is_file()


def test_a_resume_at_the_end_redraws_a_loss_curve_its_cut_end_left_behind(tmp_path, image_dir):
    out = tmp_path / "run"
    args = ("--data", str(image_dir), "--epochs", "1", "--max-steps", "2", "--figure-images", "1")
    assert pretrain(*args, "--out", str(out)) == 0
    curve = out / "loss.png"
    drawn = curve.read_bytes()
    curve.write_bytes((out / "reconstruction-000000.png").read_bytes())  # a PNG of an earlier checkpoint
    for name in ("encoder.safetensors", "config.json"):  # the kill: in the last checkpoint's loss.png, no export
        (out / name).unlink()
    assert pretrain(*args, "--out", str(out), "--resume", "auto") == 0
    assert curve.read_bytes() == drawn
