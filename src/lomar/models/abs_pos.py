"""Absolute position tables: MAE's 2-D sin-cos table, and one rule for a table at another grid (bicubic
resampling, as MAE's finetuning and timm do), which every way of loading an encoder at another size follows."""

from __future__ import annotations

import math

import torch

__all__ = ["sincos_pos_embed_2d", "sincos_grid", "square_side", "table_for_grid"]


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table (SPEC §5): (Hg·Wg [+1], dim), x in the first half."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                            torch.arange(grid[1], dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.flatten()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(xs), encode(ys)], dim=1).float()
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table


def sincos_grid(table: torch.Tensor) -> tuple[int, int] | None:
    """The grid whose MAE sin-cos table an absolute table (1, 1+N, D) is (it names its grid exactly, a non-square
    one too), or None (a table that finetuning trained)."""
    n, dim = table.shape[1] - 1, table.shape[2]
    grids = [(h, n // h) for h in range(1, n + 1) if n % h == 0] if dim % 4 == 0 else []
    return next((g for g in grids if torch.allclose(table[0], sincos_pos_embed_2d(dim, g).to(table.dtype))), None)


def square_side(table: torch.Tensor) -> int | None:
    """The side of the square patch grid an absolute table (1, 1+N, D) is of, or None when N is no square: no shape
    tells a 12x16 grid from a 16x12 one, so a caller needs the size the table was trained at."""
    cells = table.shape[1] - 1
    side = math.isqrt(cells)
    return side if side * side == cells else None


def table_for_grid(table: torch.Tensor, grid: tuple[int, int],
                   source: tuple[int, int] | None = None) -> torch.Tensor:
    """An absolute table (1, 1+N, D) of the ``source`` grid for another ``grid``, resampled bicubically with the
    cls row kept, as MAE's finetuning, timm and :meth:`VisionTransformer.pos_embed_for` do (untouched at its own
    grid). ``source`` unknown: the grid a sin-cos table names, else this grid when N fits it, else a square one as
    timm's ViT assumes (N not a square: ValueError)."""
    n = table.shape[1] - 1
    source = source or sincos_grid(table)
    if source is None and n == grid[0] * grid[1]:
        return table
    if source is None:
        side = square_side(table)
        if side is None:
            raise ValueError(f"a trained position table of {n} tokens (a non-square grid) cannot be resized to the "
                             f"{grid[0]}x{grid[1]} grid here; load it at its own size (lomar.create_encoder)")
        source = (side, side)
    if source[0] * source[1] != n:
        raise ValueError(f"a position table of {n} tokens is not of the {source[0]}x{source[1]} grid its settings "
                         f"give; re-export the encoder (lomar export)")
    # timm imports torchvision and with it torch._dynamo (about a second): only for a resize
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(table, list(grid), list(source), antialias=False)
