"""The linear probe's recipe step by step: its BatchNorm and initial weights (MAE's), and the lr each optimizer step
takes under either protocol (AdamW's cosine without warm-up, MAE's LARS warm-up then cosine by fractional epoch)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from lomar.eval.linear_probe import LARS, LinearProbe, train_linear_probe, train_mae_linear_probe


def test_the_probe_norm_has_maes_epsilon_and_no_affine_parameters():
    probe = LinearProbe(3, 2).train()
    # a feature of variance 1e-6 beside eps 1e-6 comes out at std 1/sqrt(2); torch's default eps (1e-5) gives 0.30
    x = torch.randn(4096, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([1e-3, 1.0, 10.0])
    out = probe.norm(x)
    var = x.var(0, unbiased=False)
    torch.testing.assert_close(out.std(0, unbiased=False), (var / (var + 1e-6)).sqrt(), rtol=1e-4, atol=0)
    assert [name for name, _ in probe.named_parameters()] == ["linear.weight", "linear.bias"]


def test_the_probe_head_starts_at_std_001_and_zero_bias():
    torch.manual_seed(0)
    probe = LinearProbe(512, 200)
    weight = probe.linear.weight.detach()
    assert abs(float(weight.std()) - 0.01) < 0.0005  # 102,400 draws: the std of the estimate is 2e-5
    assert not probe.linear.bias.any()


def _record_lrs(monkeypatch, optimizer_class) -> list[float]:
    """The lr of every step ``optimizer_class`` takes from here on."""
    lrs, step = [], optimizer_class.step

    def recording(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(optimizer_class, "step", recording)
    return lrs


def _features(n: int = 40):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    return torch.randn(n, 6, generator=gen) + y[:, None], y


def test_the_adamw_probe_steps_down_one_cosine_from_its_lr_without_warm_up(monkeypatch):
    lrs = _record_lrs(monkeypatch, torch.optim.AdamW)
    x, y = _features(40)
    train_linear_probe(x, y, x, y, epochs=3, batch_size=16, lr=0.02)
    total = 3 * (40 // 16)  # 2 steps an epoch: the ragged tail joins the last batch
    assert lrs == pytest.approx([0.02 * 0.5 * (1 + math.cos(math.pi * i / total)) for i in range(total)], rel=1e-12)


def test_the_mae_probe_warms_up_then_cosines_by_fractional_epoch_at_blr_times_batch(monkeypatch):
    lrs = _record_lrs(monkeypatch, LARS)
    x, y = _features(40)
    train_mae_linear_probe(x, y, x, y, epochs=4, batch_size=16, blr=0.2, warmup_epochs=2)
    lr, per_epoch = 0.2 * 16 / 256, 40 // 16
    expected = []
    for step in range(4 * per_epoch):
        t = step / per_epoch  # MAE's fractional epoch
        expected.append(lr * t / 2 if t < 2 else lr * 0.5 * (1 + math.cos(math.pi * (t - 2) / 2)))
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("train", [train_linear_probe, functools.partial(train_mae_linear_probe, warmup_epochs=0)],
                         ids=["adamw", "mae"])
def test_two_training_images_are_enough_one_is_not(train):
    x, y = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1])
    _, top1 = train(x, y, x, y, epochs=1, batch_size=4)  # one batch of 2: BatchNorm's statistics exist
    assert isinstance(top1, float) and 0 <= top1 <= 1  # a plain number, as --json writes it
    with pytest.raises(ValueError, match=r"^the linear probe needs at least 2 training images"):
        train(x[:1], y[:1], x, y, epochs=1, batch_size=4)


def test_an_optimizer_error_that_is_no_overflow_stays_itself(monkeypatch):
    def fails(self, *args, **kwargs):
        raise RuntimeError("expected all tensors to be on the same device")

    monkeypatch.setattr(torch.optim.AdamW, "step", fails)
    x, y = _features(8)
    with pytest.raises(RuntimeError, match="^expected all tensors to be on the same device$"):
        train_linear_probe(x, y, x, y, epochs=1, batch_size=4)


@pytest.mark.parametrize("train", [train_linear_probe, functools.partial(train_mae_linear_probe, warmup_epochs=1)],
                         ids=["adamw", "mae"])
def test_the_seed_alone_decides_the_probe_whatever_the_global_generator_holds(train):
    x, y = _features(16)
    probes = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        probes.append(train(x, y, x, y, epochs=2, batch_size=8, seed=3)[0].state_dict())
    for key, value in probes[0].items():
        assert torch.equal(probes[1][key], value), key


def test_a_warm_up_as_long_as_the_mae_probes_epochs_is_all_rising(monkeypatch):
    lrs = _record_lrs(monkeypatch, LARS)
    x, y = _features(16)
    train_mae_linear_probe(x, y, x, y, epochs=2, batch_size=8, blr=0.2, warmup_epochs=2)
    lr = 0.2 * 8 / 256
    assert lrs == pytest.approx([lr * step / 2 / 2 for step in range(4)], rel=1e-12)  # fractional epoch step / 2


@pytest.mark.parametrize("train", [train_linear_probe, functools.partial(train_mae_linear_probe, warmup_epochs=0)],
                         ids=["adamw", "mae"])
def test_each_epoch_reads_the_features_in_a_new_shuffled_order(monkeypatch, train):
    """Features cached in class-folder order (all of class 0, then class 1) reach the probe shuffled afresh each
    epoch, as MAE's sampler shuffles: read in order, every batch would hold one class and BatchNorm would normalise
    the class away."""
    batches, forward = [], LinearProbe.forward

    def recording(self, features):
        if self.training:
            batches.append(features[:, 0].long().tolist())
        return forward(self, features)

    monkeypatch.setattr(LinearProbe, "forward", recording)
    n, y = 40, torch.arange(40) // 20  # sorted by class
    x = torch.cat([torch.arange(float(n))[:, None], torch.randn(n, 3, generator=torch.Generator().manual_seed(0))], 1)
    train(x, y, x, y, epochs=3, batch_size=10)
    epochs = [sum(batches[i:i + 4], []) for i in range(0, 12, 4)]  # 4 batches an epoch
    assert len(batches) == 12 and all(sorted(order) == list(range(n)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3
    assert all(len({i // 20 for i in batch}) == 2 for batch in batches)  # every batch mixes the two classes
