"""The paper's experiments as presets: each valid at both scales, each runs at small scale, and
`--scale paper` prints the paper's settings."""

from __future__ import annotations

import json

import pytest
import yaml

from lomar.cli.app import main
from lomar.cli.study.flags import parse_flags, settings_flags
from lomar.cli.study.presets import PAPER_PRESETS, build_preset
from lomar.cli.study.runner import check_cells
from lomar.train.config import add_config_arguments, resolve_config


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_every_cell_of_every_paper_preset_is_a_valid_run(name, tmp_path):
    check_cells(build_preset(name, budget="10s"))  # each passes `lomar pretrain --print-config` on the demo data
    for cell in build_preset(name, scale="paper").cells():  # the paper's settings resolve (for the user's data)
        flags = settings_flags(cell.settings) + ["--data", str(tmp_path), "--out", str(tmp_path / "r")]
        config = resolve_config(parse_flags(add_config_arguments, flags + ["--print-config"]))
        assert config.img_size == 224 and config.window_size == cell.settings.get("window_size", 7)


def test_the_presets_hold_the_papers_grids():
    assert [v["mask_ratio"] for _, v in build_preset("mask-ratio").grid["mask_ratio"]] == \
        [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    paper = build_preset("windows", scale="paper")
    assert [(v["window_size"], v["windows"]) for _, v in paper.grid["window"]] == \
        [(5, 8), (7, 4), (9, 3), (11, 2), (14, 1)]
    assert paper.settings["img_size"] == 224 and paper.settings["model"] == "vit_base_patch16"  # 14x14 grid
    table5 = build_preset("table5")
    assert [v["method"] for _, v in table5.grid["design"]] == ["beit", "beit"]
    assert [v["windows"] for _, v in table5.grid["design"]][0] == 0
    fig3 = build_preset("fig3", scale="paper")
    assert fig3.budget.unit == "epochs" and fig3.settings["epochs"] == fig3.budget.value


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_scale_paper_prints_the_papers_settings(name, capsys):
    assert main(["study", "--preset", name, "--scale", "paper"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["settings"]["model"] == "vit_base_patch16" and printed["settings"]["img_size"] == 224
    assert printed["settings"]["window_size"] == 7 and printed["budget"] == "400 epochs"
    if name in ("fig3", "table5"):
        assert printed["recipes"]["beit"]["betas"] == [0.9, 0.999]


def test_scale_paper_is_refused_where_the_paper_has_no_such_experiment(capsys):
    assert main(["study", "--preset", "digits", "--scale", "paper"]) == 2
    assert "has no paper scale" in capsys.readouterr().err


@pytest.mark.slow  # a few tiny ViTs x 1 step each (BEiT fits its k-means tokenizer): ~10-40 s per preset
@pytest.mark.parametrize("name", ["fig3", "table5", "windows", "mask-ratio", "pos"])
def test_each_paper_preset_runs_at_small_scale(name, tmp_path, capsys, no_run_figures):
    out = tmp_path / "study"
    assert main(["study", "--preset", name, "--budget", "1steps", "--out", str(out)]) == 0, capsys.readouterr().err
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == len(build_preset(name).cells())
    assert all(r["step"] == 1 and r["train_loss"] > 0 for r in records)
