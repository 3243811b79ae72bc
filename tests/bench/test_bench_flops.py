"""``lomar bench``'s exact FLOP counts (LoMaR's fixed by its windows, MAE's growing with size, attention forward and
backward whatever the kernel), the CPU GEMM ceiling, and the paper's window rule. Nothing here is timed."""

import types

import pytest
import torch
from bench_device import CPU

from lomar.bench import timing
from lomar.bench.timing import build_runner
from lomar.window_counts import paper_windows


def _flops(method: str, size: int, windows: int | None) -> int:
    runner = build_runner(method, "vit_base_patch16", size, windows, 2, CPU, "fp32", False, tiny=True)
    return runner.count_flops()


def test_lomar_flops_independent_of_image_size_with_fixed_windows():
    counts = {size: _flops("lomar", size, 4) for size in (224, 448, 896)}
    assert counts[224] > 0
    assert counts[224] == counts[448] == counts[896], counts


def test_lomar_flops_grow_with_windows_and_mae_with_size():
    assert _flops("lomar", 224, 8) > _flops("lomar", 224, 4)
    assert _flops("mae", 448, None) > 3 * _flops("mae", 224, None)


def test_mae_s_decoder_flops_and_each_encoder_s_tokens_are_told_apart():
    """MAE's decoder keeps its size whatever the encoder: 95 % of vit_tiny_patch16's step FLOPs at 224 px, so a
    small model's MAE / LoMaR ratio is mostly that decoder; the bench says its share."""
    mae = build_runner("mae", "vit_base_patch16", 128, None, 2, CPU, "fp32", False, tiny=True)
    lomar = build_runner("lomar", "vit_base_patch16", 128, 2, 2, CPU, "fp32", False, tiny=True)
    mae.count_flops(), lomar.count_flops()
    assert 0 < mae.decoder_flops < mae.flops and lomar.decoder_flops == 0
    # the encoder's work an image: MAE's visible quarter of the 8x8 grid, LoMaR's 2 windows of 7x7, each + [CLS]
    assert (mae.encoder_tokens, lomar.encoder_tokens) == (64 // 4 + 1, 2 * (49 + 1))


def test_cpu_attention_flops_are_counted():
    # torch's counter lacks the CPU flash-attention kernel; lomar.bench.timing registers it.
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 3, 10, 8)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 10 * 10 * 8)


class _Attend(torch.nn.Module):
    """One attention over (2, 3, 10, 8) inputs, fused (no mask) or as plain matmuls (a bias with a gradient)."""

    def __init__(self, biased: bool):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(8))
        self.bias = torch.nn.Parameter(torch.zeros(2, 3, 10, 10)) if biased else None

    def forward(self, images):
        q = images * self.scale
        return types.SimpleNamespace(loss=torch.nn.functional.scaled_dot_product_attention(
            q, q, q, attn_mask=self.bias).sum())


def test_step_counts_attention_backward_as_its_four_products_whatever_the_kernel():
    # A fused kernel's backward recomputes the scores (torch counts five products); the MFU's model FLOPs
    # count the gradient's four, as the same attention run as matmuls does: one model, one count.
    counts = []
    for biased in (False, True):
        model = _Attend(biased)
        runner = timing.StepRunner("x", 8, None, 2, model, model, torch.optim.SGD(model.parameters(), lr=0.0),
                                   torch.randn(2, 3, 10, 8), CPU, torch.float32,
                                   torch.amp.GradScaler("cpu", enabled=False))
        counts.append(runner.count_flops())
    forward = 2 * (2 * 2 * 3 * 10 * 10 * 8)
    assert counts == [3 * forward, 3 * forward]


def test_cpu_gemm_ceiling_is_the_faster_of_mkl_and_onednn(monkeypatch):
    a, b = torch.randn(64, 48), torch.randn(32, 48)
    onednn = timing._onednn_linear(a, b)
    if onednn is None:
        pytest.skip("this torch has no oneDNN")
    assert torch.allclose(onednn().to_dense(), a @ b.T, atol=1e-4)
    # each measurement times both libraries; the slower one must not set the ceiling
    seconds = iter([1.0, 2.0] + [4.0, 0.5] + [0.25, 1.0])  # warm-up (MKL, oneDNN), then two measurements
    monkeypatch.setattr(timing, "timed", lambda fn, device: (fn(), next(seconds))[1])
    ceiling = timing.GemmCeiling(CPU, "fp32", 8)
    flop = 2 * 8 ** 3
    assert [ceiling(), ceiling()] == [flop / 0.5, flop / 0.25]
    assert ceiling.rates == {"torch.mm": [flop / 4.0, flop / 0.25], "oneDNN": [flop / 0.5, flop / 1.0]}
    assert ceiling.per_call() == [flop / 0.5, flop / 0.25]
    assert ceiling.medians() == {"torch.mm": (flop / 4.0 + flop / 0.25) / 2, "oneDNN": (flop / 0.5 + flop / 1.0) / 2}


def test_paper_window_rule():
    # the paper's three points exactly; area-linear between them, area-proportional outside
    assert [paper_windows(s) for s in (160, 224, 320, 384, 416, 448, 672, 896)] == [2, 4, 5, 6, 7, 9, 20, 36]
