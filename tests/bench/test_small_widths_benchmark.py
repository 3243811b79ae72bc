"""``benchmarks/small_widths.py``: its GEMM sets are a training step's linear products, both of its
measurements run on tiny shapes (the real run takes minutes), and its JSON names the command that wrote it."""

import json
import sys

import torch

from helpers import load_benchmark
from lomar.bench.timing import build_runner
from lomar.values import command_line


def test_linear_products_are_a_blocks_forward_and_both_gradients():
    products = load_benchmark("small_widths").linear_products(10, 4)
    assert len(products) == 12  # qkv, proj, fc1, fc2: forward, input gradient, weight gradient
    assert (10, 4, 12) in products and (10, 12, 4) in products and (12, 10, 4) in products  # qkv
    assert (10, 16, 4) in products and (4, 10, 16) in products  # fc2 and its weight gradient
    assert sum(2 * m * k * n for m, k, n in products) == 3 * 2 * 10 * (4 * 12 + 4 * 4 + 4 * 16 + 16 * 4)


def test_both_measurements_run_and_report_ratios():
    bench = load_benchmark("small_widths")
    gemms = bench.gemm_rates(1, {"tiny": (8, 8)}, ceiling=32, flops_per_sample=1e5)
    assert set(gemms) == {"tiny", "ceiling"} and gemms["ceiling"]["of_ceiling"] == 1.0
    assert gemms["tiny"]["gflops"] > 0
    irpe = bench.irpe_cost("vit_mini_patch8", 56, 1, 1, 1, tiny=True)
    assert len(irpe["cpu_s"]["rpe"]) == len(irpe["cpu_s"]["none"]) == 1 and irpe["rpe_over_none"] > 0


def test_the_runner_without_position_is_the_same_step_without_irpe():
    runners = [build_runner("lomar", "vit_mini_patch8", 56, 1, 2, torch.device("cpu"), "fp32", False, tiny=True,
                            pos=pos) for pos in ("rpe", "none")]
    assert [r.model.encoder.config.pos for r in runners] == ["rpe", "none"]
    assert torch.equal(runners[0].inputs["plan"].mask, runners[1].inputs["plan"].mask)  # the same masks to compare


def test_its_json_names_the_command_that_wrote_it(tmp_path, monkeypatch):
    bench = load_benchmark("small_widths")
    monkeypatch.setattr(bench, "gemm_rates", lambda rounds: {"ceiling": dict(gflops=1.0, of_ceiling=1.0)})
    monkeypatch.setattr(bench, "irpe_cost", lambda model, px, windows, batch, rounds: dict(
        model=model, px=px, windows=windows, batch=batch, rpe_over_none=1.0, ratio_range=[1.0, 1.0]))
    out = tmp_path / "widths one.json"
    argv = ["--threads", str(torch.get_num_threads()), "--rounds", "1", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["benchmarks/small_widths.py", *argv])
    bench.main()
    result = json.loads(out.read_text())
    assert result["meta"]["command"] == command_line("python", "benchmarks/small_widths.py", *argv)
    assert result["gemms"] == {"ceiling": dict(gflops=1.0, of_ceiling=1.0)} and len(result["irpe"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # written whole, no temporary left beside it
