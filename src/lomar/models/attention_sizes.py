"""The sizes :mod:`lomar.models.attention` chooses its modes by, as plain numbers: what a memory estimate made
before any torch import (``lomar bench --task backbone``'s planner, :mod:`lomar.bench.backbone_plan`) reads too."""

from __future__ import annotations

__all__ = ["DENSE_MAX_TOKENS", "DENSE_BIAS_BYTES", "CHUNK_BIAS_BYTES"]

DENSE_MAX_TOKENS = 1025  # auto: dense up to [cls] + 32x32 tokens (512 px at patch 16)
DENSE_BIAS_BYTES = 256 * 2**20  # auto: dense below this bias size per block (1 image, ViT-B: 48x48 grid)
CHUNK_BIAS_BYTES = 64 * 2**20  # chunked: target size of one chunk's bias
