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

__all__ = ["RPE_RATIO", "NUM_BUCKETS", "SELECTION_LIMIT", "piecewise_index", "offset_buckets", "bucket_rows",
           "bucket_table", "bucket_selection", "irpe_bias", "ContextualRPE"]

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
def _offset_buckets_cpu(height: int, width: int) -> torch.Tensor:
    def axis(n: int) -> torch.Tensor:
        return piecewise_index(torch.arange(-(n - 1), n)) + int(_BETA)  # (2n-1,)

    return axis(height)[:, None] * _SIDE + axis(width)[None, :]


def offset_buckets(grid: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Bucket of a (query, key) pair of spatial tokens by offset: (2H−1, 2W−1) int64, entry
    [dy + H−1, dx + W−1] for dy = y_q − y_k, dx = x_q − x_k (the bucket depends on nothing else)."""
    return _offset_buckets_cpu(int(grid[0]), int(grid[1])).to(device)


def bucket_rows(offsets: torch.Tensor, grid: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the (L, L) bucket table of [cls]+grid tokens, from ``offsets``
    (see :func:`offset_buckets`): (stop − start, 1 + H·W) int64, without building the full table."""
    height, width = grid
    device = offsets.device
    rows = torch.arange(start, stop, device=device) - 1  # spatial index of each query; -1 is cls
    cols = torch.arange(height * width, device=device)
    qy, qx = rows.clamp_min(0).div(width, rounding_mode="floor"), rows.clamp_min(0) % width
    ky, kx = cols.div(width, rounding_mode="floor"), cols % width
    spatial = offsets[(qy[:, None] - ky[None, :]) + height - 1, (qx[:, None] - kx[None, :]) + width - 1]
    spatial = spatial.masked_fill((rows < 0)[:, None], CLS_BUCKET)
    cls_col = torch.full((stop - start, 1), CLS_BUCKET, dtype=spatial.dtype, device=device)
    return torch.cat([cls_col, spatial], dim=1)


_DEVICE_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


# A constant of the compiled graph, on its device. Traced instead, a first call (key missing) stored into the
# cache and guarded on the key's absence, so the compiled step compiled a second time on its second call.
@torch.compiler.assume_constant_result
def bucket_table(grid: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Bucket id of every (query, key) pair, cls first: (Hg·Wg+1, Hg·Wg+1) int64, cached."""
    height, width = int(grid[0]), int(grid[1])
    key = (height, width, str(torch.device(device)))
    if key not in _DEVICE_CACHE:
        _DEVICE_CACHE[key] = bucket_rows(offset_buckets(grid), (height, width), 0, height * width + 1).to(device)
    return _DEVICE_CACHE[key]


# Largest (L', 50, L) selection matrix irpe_bias builds: 4M entries, a grid of 288 patches and cls (16x18).
SELECTION_LIMIT = 1 << 22


def bucket_selection(buckets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """buckets (L', L) -> (L', 50, L) 0/1 matrix: entry [i, n, j] is 1 where bucket(i, j) = n."""
    # A comparison, not one_hot: one_hot reads the ids' min and max back on the CPU, so a CPU test could not
    # tell it from a read that waits for a GPU (tests/bench/test_step_host_reads.py).
    ids = torch.arange(NUM_BUCKETS, device=buckets.device)
    return (buckets[:, None, :] == ids[:, None]).to(dtype)


def irpe_bias(q: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """q (B, h, L', d) unscaled queries, table (d, 50), buckets (L', L) -> bias (B, h, L', L).

    The bias picks T[i, bucket(i, j)] from T = q·W (B, h, L', 50). Up to :data:`SELECTION_LIMIT`
    it does so by a batched matmul with :func:`bucket_selection`: the same values exactly (each
    output sums one product with 1 and the rest with 0), and a backward that is a matmul too. A
    gather's backward scatter-adds B·h·L'·L values into 50 buckets with atomics: 15 % of a compiled
    ViT-B step at 448 px / 9 windows on an H200 (benchmarks/README.md). Longer rows gather, so the
    matrix stays within 16 MB (fp32).
    """
    scores = torch.matmul(q, table.to(q.dtype))  # (B, h, L', 50)
    if buckets.numel() * NUM_BUCKETS <= SELECTION_LIMIT:
        return torch.einsum("bhin,inj->bhij", scores, bucket_selection(buckets, scores.dtype))
    return scores.gather(-1, buckets.expand(*scores.shape[:-1], buckets.shape[-1]))


class ContextualRPE(nn.Module):
    """The per-block iRPE parameter and the bias it produces.

    ``forward(q, buckets)``: q (B, h, L, d) unscaled queries, buckets (L, L) from
    :func:`bucket_table` -> bias (B, h, L, L) to add to the scaled attention logits.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(1, head_dim, NUM_BUCKETS))

    def forward(self, q: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        return irpe_bias(q, self.table[0], buckets)
