"""`lomar bench --methods ... beit`: BEiT, BEiT + windows and MAE + windows records; tokenizer FLOPs counted."""

from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from lomar.bench.timing import build_runner
from lomar.cli.app import main


def test_bench_writes_beit_and_window_records(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "--methods", "lomar", "mae", "beit", "mae_window", "--sizes", "160",
                 "--batch-size", "1",
                 "--steps", "1", "--warmup", "0", "--device", "cpu", "--quiet", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    methods = [r["method"] for r in data["records"]]
    assert methods == ["lomar", "mae", "beit", "mae_window", "beit_window"]
    assert all(r["flops"] > 0 and r["step_s"] > 0 for r in data["records"])
    ratios = data["beit_comparisons"][0]
    assert ratios["img_size"] == 160 and ratios["beit_over_lomar_time"] > 0


def test_windowed_baselines_take_lomars_paper_count_at_any_patch_size(tmp_path):
    """--windows paper: MAE + windows and BEiT + windows use LoMaR's count for the model's own grid."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "--model", "vit_mini_patch8", "--methods", "lomar", "mae_window", "beit",
                 "--sizes", "96", "--batch-size", "1", "--steps", "1", "--warmup", "0", "--device", "cpu", "--quiet",
                 "--json", str(out)]) == 0
    windows = {r["method"]: r["windows"] for r in json.loads(out.read_text())["records"]}
    assert windows["lomar"] == windows["mae_window"] == windows["beit_window"] == 3  # a 12x12 grid, 7x7 windows


def test_beit_step_flops_include_the_tokenizer():
    runner = build_runner("beit", "vit_base_patch16", 112, None, 1, torch.device("cpu"), "fp32", False, tiny=True)
    model = runner.model
    torch.manual_seed(0)  # the same block masks (drawn from the global RNG) in both counts
    with_tokenizer = runner.count_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        model.tokens(runner.images)
    tokenizer_flops = counter.get_total_flops()
    assert tokenizer_flops > 0
    fixed = model.tokens(runner.images)
    model.tokens = lambda images: fixed  # same targets, no tokenizer
    torch.manual_seed(0)
    assert runner.count_flops() == with_tokenizer - tokenizer_flops
