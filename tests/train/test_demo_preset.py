"""`lomar pretrain` with no arguments: the demo preset spends its budget on training and shows it."""

from __future__ import annotations

import pytest
import yaml

from helpers import losses
from lomar.cli.app import main
from lomar.data.demo_images import demo_image_paths


def test_demo_schedule_draws_several_figures_and_stays_cpu_sized(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["device"] == "cpu" and config["img_size"] <= 128 and config["depth"] <= 4
    # figures before step 0, at each checkpoint and at the end: at least three after the first
    assert config["epochs"] % config["save_every"] == 0 and config["epochs"] // config["save_every"] >= 3
    per_epoch = len(demo_image_paths()) * 8 // config["batch_size"]  # the demo shows each photo 8 times
    steps = per_epoch * config["epochs"]
    assert 300 <= steps <= 700, steps  # ~0.22 s a step on one core: about 2 minutes
    assert config["warmup_epochs"] * per_epoch <= steps // 10


@pytest.mark.slow
def test_demo_model_learns_within_a_few_dozen_steps(tmp_path, capsys):
    out = tmp_path / "run"
    # --save-every 6: no checkpoint before the run ends at step 40 (7 steps an epoch), so no figure between the
    # first and the last, the two the test reads (a mid-run checkpoint and figure take a tenth of its time)
    assert main(["pretrain", "--out", str(out), "--max-steps", "40", "--epochs", "6", "--warmup-epochs", "1",
                 "--save-every", "6"]) == 0
    values = losses(out)
    assert sum(values[-10:]) / 10 < 0.7 * values[0]
    assert (out / "reconstruction-000000.png").is_file() and (out / "reconstruction-000040.png").is_file()
    assert f"loss {values[0]:.4f} at step 1 -> {values[-1]:.4f} at step 40" in capsys.readouterr().out
