"""Linear probe on frozen features: BatchNorm + linear, trained on cached features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearProbe", "train_linear_probe"]


class LinearProbe(nn.Module):
    """BatchNorm without affine parameters + a linear layer on frozen features (as in MAE)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> logits (B, C)."""
        return self.linear(self.norm(features))


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                       epochs: int = 90, batch_size: int = 256, lr: float = 1e-2, weight_decay: float = 0.0,
                       seed: int = 0) -> tuple[LinearProbe, float]:
    """Train the probe on cached features; returns (probe, val top-1 in [0, 1]).

    MAE trains its probe with LARS at batch 16384 through the frozen encoder with light
    augmentation. Here features are computed once (centre crops) and the probe, a convex
    problem, is trained with AdamW and a per-step cosine schedule: same model, orders of
    magnitude cheaper, slightly lower numbers than with augmentation.
    """
    if train_x.shape[0] < 2:
        raise ValueError("the linear probe needs at least 2 training images (BatchNorm statistics)")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classes = int(max(train_y.max(), val_y.max())) + 1
    probe = LinearProbe(train_x.shape[1], classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = max(1, train_x.shape[0] // batch_size)
    total = epochs * per_epoch
    probe.train()
    step = 0
    from lomar.train.monitor import progress

    for _ in progress(range(epochs), desc="linear probe", unit="epoch"):
        order = torch.randperm(train_x.shape[0], generator=gen)
        # Equal batches (the ragged tail joins the last one): BatchNorm needs > 1 sample.
        for idx in order.tensor_split(per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    probe.eval()
    with torch.no_grad():
        accuracy = float((probe(val_x).argmax(1) == val_y).float().mean())
    return probe, accuracy
