"""The optimisation recipe as pure functions: learning-rate schedule and weight-decay groups."""

from __future__ import annotations

import math

import torch

__all__ = ["lr_at", "param_groups"]


def lr_at(step: float, steps_per_epoch: int, base_lr: float, warmup_epochs: float, epochs: float,
          min_lr: float = 0.0) -> float:
    """lr for optimizer step ``step`` (0-based): per-iteration linear warm-up from 0 over
    ``warmup_epochs``, then a half-cycle cosine down to ``min_lr`` at ``epochs``.

    A pure function of the step, so a resumed run follows the same curve exactly.
    """
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The original decay rule: no decay for biases and 1-D parameters, decay for the rest
    (so the 3-D cls/mask tokens and RPE tables are decayed, SPEC §4)."""
    decay, no_decay = [], []
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()  # e.g. BEiT's cls_token
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim == 1 or name.endswith(".bias") or name in skip else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
