"""A run's figures: the reconstruction before training and at each checkpoint, and loss.png;
the done line gives the first and last loss and what to run next."""

from __future__ import annotations

import re

from helpers import losses, pretrain


def test_first_and_last_reconstruction_and_loss_curve(tmp_path, image_dir, capsys):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "3") == 0
    figures = sorted(p.name for p in out.glob("reconstruction-*.png"))
    assert figures == ["reconstruction-000000.png", "reconstruction-000003.png"]
    assert (out / "reconstruction.png").read_bytes() == (out / "reconstruction-000003.png").read_bytes()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lomar pretrain: done"))
    first, last = losses(out)[0], losses(out)[-1]
    assert re.search(rf"loss {first:.4f} at step 1 -> {last:.4f} at step 3", done)
    assert f"lomar visualize {out / 'last.pt'}" in done and f"lomar export {out / 'last.pt'} --to" in done


def test_overwrite_removes_the_old_runs_figures(tmp_path, image_dir):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "3") == 0
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "2", "--overwrite") == 0
    assert sorted(p.name for p in out.glob("reconstruction-*.png")) == ["reconstruction-000000.png",
                                                                       "reconstruction-000002.png"]
