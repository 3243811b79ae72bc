"""Relative position terms that enter attention as an additive bias over [cls] + a grid of tokens.

- BEiT's table (Bao et al.): one learned bias per head for each (Δy, Δx) of a query–key pair, plus
  three for the pairs with the cls token; :func:`table_bias` (BEiT pretrains with it) and
  :func:`table_rows` (mmsegmentation's MAE backbone adds one per block, zero-initialised, for segmentation).
- ViTDet's decomposed term (Li et al., 2022): q_i·R_h[Δy] + q_i·R_w[Δx] with learned per-axis
  tables (2S−1, head_dim), zero-initialised; :func:`decomposed_rows`. ViTDet adds it to every block
  of an MAE backbone for detection.

The dense tasks' terms come as rows (:data:`BiasRows`), so that attention can build the bias of a few
queries at a time (:func:`lomar.models.attention.biased_attention`); ``rows(0, L)`` is the whole bias.

``REL_POS_MODES`` (:mod:`lomar.models.vit_config`) names the choice a :class:`~lomar.models.vit.ViTConfig`
records: ``none``, ``decomposed`` or ``bias``. LoMaR's own contextual RPE is :mod:`lomar.models.rpe`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["REL_POS_PARAMS", "relative_position_index", "table_bias", "resize_bias_table",
           "table_rows", "resize_axis_table", "axis_table", "fit_axis_tables",
           "decomposed_rows", "decomposed_bias", "BiasRows"]

# rows(start, stop) -> the bias rows of queries start..stop-1, (B or 1, heads, stop - start, L)
BiasRows = Callable[[int, int], torch.Tensor]
# The parameter names of the terms in a ViT's attention blocks (ViTDet's and mmsegmentation's own names)
REL_POS_PARAMS = ("rel_pos_h", "rel_pos_w", "relative_position_bias_table")


def relative_position_index(grid: tuple[int, int], table_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(L+1, L+1) int64 rows of a bias table built for ``table_grid`` (default ``grid``), cls at 0.

    Patch pairs use (Δy + Th−1)·(2Tw−1) + (Δx + Tw−1) with Δ = query − key; the last three rows of
    the table are cls→patch, patch→cls and cls→cls. A grid smaller than ``table_grid`` uses the
    subset of offsets it can reach, so a model built for 14×14 can attend within 7×7 windows.
    """
    gh, gw = grid
    th, tw = table_grid or grid
    if not (1 <= gh <= th and 1 <= gw <= tw):
        raise ValueError(f"grid {gh}x{gw} does not fit a bias table built for {th}x{tw}; build the model "
                         f"for a grid at least that large")
    n_rel = (2 * th - 1) * (2 * tw - 1) + 3
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + th - 1
    dx = xs[:, None] - xs[None, :] + tw - 1
    index = torch.empty(gh * gw + 1, gh * gw + 1, dtype=torch.long)
    index[1:, 1:] = dy * (2 * tw - 1) + dx
    index[0, :] = n_rel - 3
    index[:, 0] = n_rel - 2
    index[0, 0] = n_rel - 1
    return index


# On the table's device, so that a compiled step holds no host constant (which would copy to the GPU each step
# and keep CUDA graphs off).
_INDEX_CACHE: dict[tuple[tuple[int, int], tuple[int, int], str], torch.Tensor] = {}


@torch.compiler.assume_constant_result  # as lomar.models.rpe.bucket_table: no second compile on a cold cache
def _cached_index(grid: tuple[int, int], table_grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    key = (tuple(grid), tuple(table_grid), str(device))
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = relative_position_index(*key[:2]).to(device)
    return _INDEX_CACHE[key]


def table_bias(table: torch.Tensor, table_grid: tuple[int, int], grid: tuple[int, int] | None = None) -> torch.Tensor:
    """table ((2Th−1)(2Tw−1)+3, heads) → bias (heads, L+1, L+1) for ``grid`` (default ``table_grid``)."""
    index = _cached_index(grid or table_grid, table_grid, table.device)
    return table[index.flatten()].view(*index.shape, -1).permute(2, 0, 1).contiguous()


def resize_bias_table(table: torch.Tensor, table_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """A BEiT table ((2Th−1)(2Tw−1)+3, heads) built for ``table_grid``, resampled bicubically to the
    offsets of a larger ``grid``, ((2H−1)(2W−1)+3, heads); the three cls entries are kept."""
    (th, tw), (gh, gw) = table_grid, grid
    offsets = table[:-3].T.reshape(1, -1, 2 * th - 1, 2 * tw - 1)
    resized = F.interpolate(offsets.float(), size=(2 * gh - 1, 2 * gw - 1), mode="bicubic", align_corners=False)
    return torch.cat([resized.to(table.dtype).flatten(2)[0].T, table[-3:]])


def table_rows(table: torch.Tensor, table_grid: tuple[int, int], grid: tuple[int, int]) -> BiasRows:
    """:func:`table_bias` for any ``grid``, as rows: ``rows(start, stop)`` -> (1, heads, stop − start, L+1).
    A grid larger than the table's resamples it first (:func:`resize_bias_table`)."""
    if grid[0] > table_grid[0] or grid[1] > table_grid[1]:
        wider = (max(grid[0], table_grid[0]), max(grid[1], table_grid[1]))
        table, table_grid = resize_bias_table(table, table_grid, wider), wider
    index = _cached_index(grid, table_grid, table.device)
    return lambda start, stop: table[index[start:stop]].permute(2, 0, 1)[None]


def resize_axis_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """A per-axis table (n, d) linearly resampled to (length, d) (ViTDet's ``get_rel_pos``); as is if n = length."""
    if table.shape[0] == length:
        return table
    return F.interpolate(table.T[None].float(), size=length, mode="linear", align_corners=False)[0].T.to(table.dtype)


def axis_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """R (size, size, d) with R[i, j] = the entry of offset i − j of a per-axis table (2S−1, d),
    resampled to 2·size−1 entries first when S ≠ size."""
    pos = torch.arange(size, device=table.device)
    return resize_axis_table(table, 2 * size - 1)[pos[:, None] - pos[None, :] + size - 1]


def fit_axis_tables(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """``state`` with each per-axis table (``…rel_pos_h`` / ``…rel_pos_w``) resampled to its length in
    ``shapes`` (another image or window size than it was trained at); other entries as they are."""
    return {k: resize_axis_table(v, shapes[k][0]) if k.endswith((".rel_pos_h", ".rel_pos_w")) and k in shapes
            and v.ndim == 2 and v.shape[1:] == shapes[k][1:] else v for k, v in state.items()}


def decomposed_rows(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                    grid: tuple[int, int]) -> BiasRows:
    """ViTDet's decomposed relative position term of queries q (B, h, 1+H·W, d) (unscaled) on ``grid``, as
    rows: ``rows(start, stop)`` -> (B, h, stop − start, 1+H·W), the rows of :func:`decomposed_bias`. Holds
    only the per-axis products q·R_h (B, h, H·W, H) and q·R_w (B, h, H·W, W)."""
    b, heads, length, dim = q.shape
    height, width = grid
    if length != 1 + height * width:
        raise ValueError(f"{length} tokens do not match [cls] + a {height}x{width} grid")
    spatial = q[:, :, 1:].reshape(b, heads, height, width, dim)
    along_h = torch.einsum("bnyxc,ykc->bnyxk", spatial, axis_table(rel_pos_h, height).to(q.dtype)).flatten(2, 3)
    along_w = torch.einsum("bnyxc,xkc->bnyxk", spatial, axis_table(rel_pos_w, width).to(q.dtype)).flatten(2, 3)

    def rows(start: int, stop: int) -> torch.Tensor:
        first, last = max(start, 1) - 1, stop - 1  # the patch queries among the rows (query 0 is cls)
        part = (along_h[:, :, first:last, :, None] + along_w[:, :, first:last, None, :]).flatten(-2)
        return F.pad(part, (1, 0, int(start == 0), 0))  # cls key column, and the cls query's row: 0

    return rows


def decomposed_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                    grid: tuple[int, int]) -> torch.Tensor:
    """ViTDet's decomposed relative position term, whole: bias (B, h, 1+H·W, 1+H·W) whose entry for patch
    query (y, x) and patch key (y', x') is q·R_h[y − y'] + q·R_w[x − x']; pairs with the cls token get 0
    (ViTDet has no cls token)."""
    return decomposed_rows(q, rel_pos_h, rel_pos_w, grid)(0, q.shape[2])
