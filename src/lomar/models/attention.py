"""Self-attention over [cls] + a grid of tokens, with the contextual iRPE bias, three ways.

All three compute softmax(q·kᵀ·d^-½ + B) v with B[i, j] = (q_i·W)[bucket(i, j)] (SPEC §2):

- ``dense``: the (B, h, L, L) bias from an (L, L) bucket table, added inside SDPA. Fastest for
  short sequences (pretraining windows, 224 px); O(L²) memory per block.
- ``chunked``: the same by blocks of queries: the bias of ``chunk`` queries at a time,
  (B, h, chunk, L), built from the (2H−1, 2W−1) table of buckets by offset (the bucket of a pair
  depends only on (dy, dx)), each chunk recomputed in the backward pass
  (``torch.utils.checkpoint``), so peak memory is O(L·chunk). Any device.
- ``flex``: FlexAttention with a ``score_mod`` that gathers q·W (B, h, L, 50) by the bucket of
  (q_idx, kv_idx): no L×L tensor at all, backward included. CUDA only (FlexAttention has no CPU
  backward), compiled once per shape.

``auto`` picks dense for sequences of at most ``DENSE_MAX_TOKENS`` (there the bias is no
larger than the block's other activations, whatever the batch) or while the bias of one block
stays under ``DENSE_BIAS_BYTES`` (both in :mod:`lomar.models.attention_sizes`); else flex on CUDA
and chunked elsewhere. Without RPE every mode is plain SDPA, whose fused kernels are already O(L)
in memory.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lomar.models.attention_sizes import CHUNK_BIAS_BYTES, DENSE_BIAS_BYTES, DENSE_MAX_TOKENS
from lomar.models.rpe import CLS_BUCKET, bucket_rows, bucket_table, irpe_bias, offset_buckets

__all__ = ["ATTENTION_MODES", "select_mode", "chunk_rows", "rpe_attention", "biased_attention", "flex_available",
           "irpe_score_mod", "windowed_attention", "vitdet_global_blocks"]

ATTENTION_MODES = ("auto", "dense", "chunked", "flex")


def flex_available(device: torch.device) -> bool:
    """FlexAttention with gradients needs CUDA (torch has no CPU backward for it)."""
    return device.type == "cuda"


def select_mode(mode: str, batch: int, heads: int, length: int, device: torch.device,
                element_size: int = 4) -> str:
    """The mode ``auto`` resolves to for this shape and device (other modes are returned as is)."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention {mode!r}; choose one of {', '.join(ATTENTION_MODES)}")
    if mode != "auto":
        return mode
    if length <= DENSE_MAX_TOKENS or batch * heads * length * length * element_size <= DENSE_BIAS_BYTES:
        return "dense"
    return "flex" if flex_available(device) else "chunked"


def chunk_rows(batch: int, heads: int, length: int, element_size: int = 4,
               budget: int = CHUNK_BIAS_BYTES) -> int:
    """Queries per chunk so that one chunk's (B, h, chunk, L) bias stays near ``budget`` bytes."""
    return max(16, min(length, budget // max(1, batch * heads * length * element_size)))


def _chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor,
           grid: tuple[int, int], start: int, key_bias: torch.Tensor | None) -> torch.Tensor:
    """Attention of queries q (B, h, c, d), rows ``start:start+c``, over all keys -> (B, h, c, d)."""
    return _biased(q, k, v, irpe_bias(q, table, bucket_rows(offsets, grid, start, start + q.shape[2])), key_bias)


def _biased(q, k, v, bias: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias if key_bias is None else bias + key_bias)


def _by_query_chunks(attend, q, k, v, chunk: int | None, checkpointed: bool, **rest) -> torch.Tensor:
    """``attend(q_chunk, k, v, start=, **rest)`` over ``chunk`` queries at a time, concatenated; each chunk
    ``checkpointed``: q, k, v are kept and the backward pass rebuilds the chunk's bias."""
    b, h, length, _ = q.shape
    chunk = chunk or chunk_rows(b, h, length, q.element_size())
    if checkpointed:
        attend = functools.partial(checkpoint, attend, use_reentrant=False)
    return torch.cat([attend(q[:, :, s:s + chunk], k, v, start=s, **rest) for s in range(0, length, chunk)], dim=2)


def _chunked(q, k, v, table, grid, key_bias, chunk: int | None, recompute: bool) -> torch.Tensor:
    checkpointed = recompute and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, table))
    return _by_query_chunks(_chunk, q, k, v, chunk, checkpointed, table=table,
                            offsets=offset_buckets(grid, q.device), grid=grid, key_bias=key_bias)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False: one kernel per (B, h, L, d); a backbone sees few shapes and each is cheap to keep.
    return torch.compile(flex_attention, dynamic=False)


def irpe_score_mod(scores: torch.Tensor, grid: tuple[int, int], key_bias: torch.Tensor | None):
    """FlexAttention's ``score_mod`` adding the iRPE bias: ``scores`` (B, h, L, 50) = q·W, gathered by
    the bucket of (q_idx, kv_idx), plus ``key_bias`` (B, 1, 1, L) if given.

    The compiled kernel also evaluates it on the padding of its last block (indices >= L, whose scores
    it masks afterwards) and loads what it indexes there without a bounds check (pytorch/pytorch#188178, open):
    clamped to L - 1, those indices read inside the buffers instead of past their end."""
    height, width = grid
    offsets = offset_buckets(grid, scores.device).flatten()
    span, last = 2 * width - 1, scores.shape[2] - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        q_idx, kv_idx = q_idx.clamp(max=last), kv_idx.clamp(max=last)
        qs, ks = (q_idx - 1).clamp(min=0), (kv_idx - 1).clamp(min=0)
        dy = qs // width - ks // width + height - 1
        dx = qs % width - ks % width + width - 1
        bucket = torch.where((q_idx == 0) | (kv_idx == 0), CLS_BUCKET, offsets[dy * span + dx])
        out = score + scores[b, h, q_idx, bucket]
        if key_bias is not None:
            out = out + key_bias[b, 0, 0, kv_idx]
        return out

    return score_mod


def _flex(q, k, v, table, grid, key_bias, compiled: bool = True) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = irpe_score_mod(torch.matmul(q, table.to(q.dtype)), grid, key_bias)  # q·W: (B, h, L, 50)
    return (_compiled_flex() if compiled else flex_attention)(q, k, v, score_mod=score_mod)


def rpe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor | None,
                  grid: tuple[int, int], mode: str = "auto", key_bias: torch.Tensor | None = None,
                  chunk: int | None = None, recompute: bool = True) -> torch.Tensor:
    """Attention of [cls]+grid tokens: q, k, v (B, h, 1+H·W, d) -> (B, h, 1+H·W, d).

    table: the iRPE parameter (d, 50) or None (no relative position). key_bias: (B, 1, 1, L)
    added to every logit of a key (−inf masks padding), or None. ``mode``: see the module
    docstring; ``chunk`` queries per chunk (default from ``CHUNK_BIAS_BYTES``); ``recompute``
    rebuilds each chunk in the backward pass instead of keeping its bias.
    """
    b, h, length, _ = q.shape
    if length != 1 + grid[0] * grid[1]:
        raise ValueError(f"{length} tokens do not match [cls] + a {grid[0]}x{grid[1]} grid")
    mode = select_mode(mode, b, h, length, q.device, q.element_size())
    if table is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)
    if mode == "dense":
        return _biased(q, k, v, irpe_bias(q, table, bucket_table(grid, q.device)), key_bias)
    if mode == "chunked":
        return _chunked(q, k, v, table, grid, key_bias, chunk, recompute)
    if not flex_available(q.device) and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError(f"attention='flex' needs CUDA for training (on {q.device.type} FlexAttention "
                         f"has no backward); use 'chunked' or 'auto'")
    return _flex(q, k, v, table, grid, key_bias, compiled=q.device.type == "cuda")


def _rows_chunk(q, k, v, rows, start: int, key_bias: torch.Tensor | None) -> torch.Tensor:
    return _biased(q, k, v, rows(start, start + q.shape[2]).to(q.dtype), key_bias)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows, mode: str = "auto",
                     key_bias: torch.Tensor | None = None, chunk: int | None = None,
                     recompute: bool = True) -> torch.Tensor:
    """Attention with an additive bias given by rows: q, k, v (B, h, L, d) -> (B, h, L, d).

    ``rows(start, stop)`` gives the bias of queries start..stop−1, (B or 1, h, stop − start, L) (a dense
    task's relative position term, :mod:`lomar.models.relpos`). ``dense`` builds it whole; ``chunked``
    (and ``flex``, which has no path for these terms) by ``chunk`` queries at a time, each recomputed in
    the backward pass, as :func:`rpe_attention` does; ``auto`` as :func:`select_mode` picks.
    """
    b, h, length, _ = q.shape
    if select_mode(mode, b, h, length, q.device, q.element_size()) == "dense":
        return _rows_chunk(q, k, v, rows, 0, key_bias)
    # rows' parameters (a bias table) are not visible here: checkpointing goes by the grad mode alone
    return _by_query_chunks(_rows_chunk, q, k, v, chunk, recompute and torch.is_grad_enabled(),
                            rows=rows, key_bias=key_bias)


def windowed_attention(attn, x: torch.Tensor, grid: tuple[int, int], window: int,
                       mode: str = "auto") -> torch.Tensor:
    """ViTDet-style attention inside window×window tiles: x (B, 1+H·W, D) -> (B, 1+H·W, D).

    ``attn(seq, grid=, mode=, key_bias=)`` is the block's attention module. The grid is padded
    to a multiple of ``window`` (padded keys are masked out, so a window that covers the whole
    grid equals global attention); each tile is one sequence [cls] + window²
    tokens with the iRPE buckets of the window grid, the layout LoMaR pretrains on. The cls
    token attends in every tile; its output is the mean over the tiles.
    """
    b, _, dim = x.shape
    height, width = grid
    rows, cols = -(-height // window), -(-width // window)
    pad_h, pad_w = rows * window - height, cols * window - width
    tiles = rows * cols
    spatial = F.pad(x[:, 1:].reshape(b, height, width, dim), (0, 0, 0, pad_w, 0, pad_h))
    spatial = spatial.view(b, rows, window, cols, window, dim).permute(0, 1, 3, 2, 4, 5)
    seq = torch.cat([x[:, :1].repeat_interleave(tiles, dim=0),
                     spatial.reshape(b * tiles, window * window, dim)], dim=1)
    key_bias = None
    if pad_h or pad_w:
        valid = torch.zeros(rows * window, cols * window, dtype=torch.bool, device=x.device)
        valid[:height, :width] = True
        valid = valid.view(rows, window, cols, window).permute(0, 2, 1, 3).reshape(tiles, window * window)
        valid = torch.cat([valid.new_ones(tiles, 1), valid], dim=1)  # cls is always a key
        key_bias = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, float("-inf"))
        key_bias = key_bias.repeat(b, 1)[:, None, None, :]  # (B·tiles, 1, 1, 1+window²)
    out = attn(seq, grid=(window, window), mode=mode, key_bias=key_bias)
    cls = out[:, :1].view(b, tiles, 1, dim).mean(dim=1)
    spatial = out[:, 1:].view(b, rows, cols, window, window, dim).permute(0, 1, 3, 2, 4, 5)
    spatial = spatial.reshape(b, rows * window, cols * window, dim)[:, :height, :width]
    return torch.cat([cls, spatial.reshape(b, height * width, dim)], dim=1)


def vitdet_global_blocks(depth: int) -> tuple[int, ...]:
    """ViTDet's layout of global blocks among windowed ones: the last block of each quarter of
    the depth ((2, 5, 8, 11) for 12 blocks)."""
    step = max(1, depth // 4)
    return tuple(range(step - 1, depth, step))
