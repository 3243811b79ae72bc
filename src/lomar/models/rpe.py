"""Contextual relative position encoding (iRPE, product method, on keys), SPEC §2.

Each (query, key) pair of spatial tokens falls in one of 49 buckets given by the
piecewise-quantised 2-D offset between them; pairs involving the cls token use a 50th.
A table W (1, d, 50) shared by all heads turns each query into one score per bucket,
T = q·W, and the bias of pair (i, j) is T[i, bucket(i, j)]. Offsets saturate at ±3
buckets, so the same table serves any grid: only the bucket table depends on the grid.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

__all__ = ["RPE_RATIO", "NUM_BUCKETS", "piecewise_index", "bucket_table", "ContextualRPE"]

RPE_RATIO = 1.9
_ALPHA, _BETA, _GAMMA = 1.0 * RPE_RATIO, 2.0 * RPE_RATIO, 8.0 * RPE_RATIO
_SIDE = 2 * int(_BETA) + 1  # 7 quantised offsets per axis: -3..3
NUM_BUCKETS = _SIDE * _SIDE + 1  # 49 spatial + 1 for pairs involving cls
CLS_BUCKET = NUM_BUCKETS - 1


def piecewise_index(offset: torch.Tensor) -> torch.Tensor:
    """iRPE's piecewise quantisation of integer offsets: exact near 0, log-spaced, capped at ±β."""
    x = offset.to(torch.float64)
    mag = x.abs()
    far = torch.round(_ALPHA + torch.log(mag.clamp_min(1e-12) / _ALPHA) / math.log(_GAMMA / _ALPHA)
                      * (_BETA - _ALPHA))
    far = torch.sign(x) * torch.minimum(far, torch.full_like(far, _BETA))
    return torch.where(mag <= _ALPHA, x, far).trunc().to(torch.int64)


@lru_cache(maxsize=64)
def _bucket_table_cpu(height: int, width: int) -> torch.Tensor:
    # Quantise each axis's (n, n) offsets once, then combine them by broadcasting: the same values
    # as quantising every (H·W)² pair, but cheap for large grids (64x64 at 1024 px for detection).
    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n)
        return piecewise_index(pos[:, None] - pos[None, :]) + int(_BETA)  # (n, n)

    dy, dx = axis(height), axis(width)
    spatial = dy[:, None, :, None] * _SIDE + dx[None, :, None, :]  # (H, W, H, W)
    table = torch.full((height * width + 1, height * width + 1), CLS_BUCKET, dtype=torch.int64)
    table[1:, 1:] = spatial.reshape(height * width, height * width)
    return table


_DEVICE_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


def bucket_table(grid: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Bucket id of every (query, key) pair, cls first: (Hg·Wg+1, Hg·Wg+1) int64, cached."""
    height, width = int(grid[0]), int(grid[1])
    key = (height, width, str(torch.device(device)))
    table = _DEVICE_CACHE.get(key)
    if table is None:
        table = _bucket_table_cpu(height, width).to(device)
        _DEVICE_CACHE[key] = table
    return table


class ContextualRPE(nn.Module):
    """The per-block iRPE parameter and the bias it produces.

    ``forward(q, buckets)``: q (B, h, L, d) unscaled queries, buckets (L, L) from
    :func:`bucket_table` -> bias (B, h, L, L) to add to the scaled attention logits.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(1, head_dim, NUM_BUCKETS))

    def forward(self, q: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(q, self.table[0].to(q.dtype))  # (B, h, L, 50)
        index = buckets.expand(*scores.shape[:-1], buckets.shape[-1])
        return scores.gather(-1, index)
