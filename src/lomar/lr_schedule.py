"""The learning-rate curves, pure functions of the optimizer step: :func:`lr_at` (warm-up + half-cycle cosine: MAE's,
LoMaR's, the finetuning and linear-probe recipes') and :func:`lr_at_whole_steps` (BEiT's whole-step warm-up), and a
run's peak lr (:func:`peak_lr`). What a training run lays them over (its span from its settings, the warnings of a
schedule cut short): :mod:`lomar.train.schedule`. Imports no torch."""

from __future__ import annotations

import math

__all__ = ["lr_at", "lr_at_whole_steps", "peak_lr"]


def lr_at(step: float, total_steps: float, warmup_steps: float, base_lr: float, min_lr: float = 0.0) -> float:
    """lr for optimizer step ``step`` (0-based): linear warm-up from 0 over ``warmup_steps``,
    then a half-cycle cosine down to ``min_lr`` at ``total_steps``.

    A pure function of the step, so a resumed run follows the same curve exactly.
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1e-12)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at_whole_steps(step: float, total_steps: float, warmup_steps: float, base_lr: float,
                      min_lr: float = 0.0) -> float:
    """BEiT's schedule (``cosine_scheduler`` of its ``utils.py``): the warm-up is ``warmup_steps`` rounded half up,
    whole steps evenly spaced from 0 to ``base_lr`` (numpy's ``linspace``), so it peaks at step ``n - 1``,
    one step before :func:`lr_at` (MAE's fractional-epoch warm-up) does; the cosine from step ``n`` is the same.
    """
    n = math.floor(warmup_steps + 0.5)
    if step < n:
        return base_lr * step / (n - 1) if n > 1 else 0.0
    return lr_at(step, total_steps, n, base_lr, min_lr)


def peak_lr(config, world_size: int) -> float:
    """A run's peak lr: its ``lr``, else ``blr`` x the effective batch (batch x accumulation x processes) / 256."""
    lr = getattr(config, "lr", None)
    return lr if lr is not None else config.blr * config.batch_size * config.accum_steps * world_size / 256
