"""``benchmarks/small_widths.py``: its GEMM sets are a training step's linear products, both of its
measurements run on tiny shapes (the real run takes minutes)."""

import torch

from helpers import load_benchmark
from lomar.bench.timing import build_runner


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

