"""MAE's linear-probe protocol: LARS as MAE's util/lars.py steps, and a probe that learns."""

from __future__ import annotations

import functools

import pytest
import torch

from lomar.eval.linear_probe import LARS, train_linear_probe, train_mae_linear_probe


def test_lars_step_is_maes():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(4, 3), torch.randn(4)
    w.grad, b.grad = gw.clone(), gb.clone()
    LARS([w, b], lr=0.5, weight_decay=0.1).step()
    update = gw + 0.1 * w0
    expected = w0 - 0.5 * update * (0.001 * w0.norm() / update.norm())  # trust ratio on matrices only
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # vectors: plain momentum step, no decay


def test_mae_protocol_learns_separable_features_like_the_default():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=gen) * 3
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 16, generator=gen)
    # MAE's absolute lr (0.1 x 16384 / 256 = 6.4) at this batch: LARS barely moves at 0.1 x 64 / 256
    _, mae = train_mae_linear_probe(x[:240], y[:240], x[240:], y[240:], epochs=30, batch_size=64, blr=25.6)
    _, adamw = train_linear_probe(x[:240], y[:240], x[240:], y[240:], epochs=30, batch_size=64)
    assert mae > 0.9 and adamw > 0.9


def test_a_probe_that_diverges_is_an_error_not_a_score():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 2
    with pytest.raises(ValueError, match=r"^the linear probe diverged: .* after 3 epochs; lower blr \(now 1e\+10\)$"):
        train_mae_linear_probe(x, y, x, y, epochs=3, batch_size=4, blr=1e10, warmup_epochs=0)


@pytest.mark.parametrize("train, rate", [(lambda x, y: train_linear_probe(x, y, x, y, epochs=2, batch_size=4, lr=1e300),
                                          r"lr \(now 1e\+300\)"),
                                         (lambda x, y: train_mae_linear_probe(x, y, x, y, epochs=2, batch_size=4,
                                                                              blr=1e300, warmup_epochs=0),
                                          r"blr \(now 1e\+300\)")])
def test_an_lr_past_float32_is_an_error_naming_it(train, rate):
    """torch refuses a step size past float32's range with a RuntimeError: `lomar linprobe --lr 1e300` (or 4e37,
    over AdamW's first-step bias correction) printed a traceback."""
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=rf"^the linear probe's step overflowed float32 .*; lower {rate}$"):
        train(x, torch.arange(16) % 2)


@pytest.mark.parametrize("train", [train_linear_probe, functools.partial(train_mae_linear_probe, warmup_epochs=0)],
                         ids=["adamw", "mae"])
def test_the_probes_top1_is_its_hits_over_the_queries_in_one_division(train):
    """3 or 7 of 10 is 0.3 or 0.7, as a --json holds it: float32's mean of hits gives 0.30000001192092896."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=gen), torch.arange(32) % 2
    queries = torch.randn(1, 8, generator=gen).expand(10, 8)  # one feature ten times: one class predicted for all
    _, top1 = train(x, y, queries, torch.tensor([0] * 3 + [1] * 7), epochs=2, batch_size=8)
    assert top1 in (0.3, 0.7)
