"""BEiT's blockwise masking (BEIT_SPEC §2), with the original's exact stream of random draws.

Each generator owns a ``random.Random`` instance; ``random.Random(s)`` yields the same stream
as ``random.seed(s)`` on the global module, so seeding one per image (or per loader worker)
reproduces the original masks bit for bit without touching global state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from lomar.values import as_sides, is_integer, is_real, is_size

__all__ = ["BlockMaskGenerator", "block_mask_batch", "window_blockmask_args"]

_ATTEMPTS = 10  # tries per round to place one block; fixed in the original


class BlockMaskGenerator:
    """Masks about ``num_masking_patches`` of an Hm×Wm grid with random rectangles.

    A round places at most one block of area in [min_num_patches, budget] and log-uniform aspect
    in [min_aspect, max_aspect]; masking stops at the target or after a round that places
    nothing, so a mask can have fewer than the target (never more).
    """

    def __init__(self, input_size: int | tuple[int, int], num_masking_patches: int,
                 min_num_patches: int = 4, max_num_patches: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None,
                 seed: int | None = None, rng: random.Random | None = None):
        if not is_size(input_size) or min(as_sides(input_size)) < 1:
            raise ValueError(f"input_size={input_size!r} must be a positive integer or a (height, width) pair of "
                             f"them; pass the patch grid, e.g. 14")
        height, width = as_sides(input_size)
        total = height * width
        counts = {"num_masking_patches": num_masking_patches, "min_num_patches": min_num_patches,
                  "max_num_patches": 1 if max_num_patches is None else max_num_patches}
        wrong = next((name for name, value in counts.items() if not is_integer(value)), None)
        if wrong:
            raise ValueError(f"{wrong}={counts[wrong]!r} must be a whole number of patches; use e.g. 75 of 196")
        aspects = {"min_aspect": min_aspect, "max_aspect": 1.0 if max_aspect is None else max_aspect}
        wrong = next((name for name, value in aspects.items() if not (is_real(value) and math.isfinite(value))), None)
        if wrong:  # an infinite ratio would give a block side that round() cannot turn into an int, mid-draw
            raise ValueError(f"{wrong}={aspects[wrong]!r} must be a finite number; use min_aspect=0.3 and "
                             f"max_aspect=None (1/min_aspect)")
        if not 0 < num_masking_patches <= total:
            raise ValueError(f"num_masking_patches={num_masking_patches} must be in [1, {total}] for a "
                             f"{height}x{width} grid; use e.g. round(0.38*{total})")
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches={min_num_patches} must be >= 1; use e.g. 4")
        max_blk = num_masking_patches if max_num_patches is None else max_num_patches
        if max_blk < 1:
            raise ValueError(f"max_num_patches={max_num_patches} must be >= 1 or None (= num_masking_patches)")
        if not min_aspect > 0:
            raise ValueError(f"min_aspect={min_aspect} must be > 0; use e.g. 0.3")
        hi_aspect = 1 / min_aspect if max_aspect is None else max_aspect
        if not hi_aspect >= min_aspect:
            raise ValueError(f"max_aspect={max_aspect} must be >= min_aspect={min_aspect}, or None (= 1/min_aspect)")
        if rng is not None and seed is not None:
            raise ValueError(f"pass seed={seed} or rng, not both")
        self.height, self.width = height, width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_blk
        self.log_aspect = (math.log(min_aspect), math.log(hi_aspect))
        self.rng = rng if rng is not None else random.Random(None if seed is None else int(seed))

    def __repr__(self) -> str:
        return (f"BlockMaskGenerator({self.height}x{self.width}, target={self.num_masking_patches}, "
                f"blocks {self.min_num_patches}..{self.max_num_patches}, "
                f"aspect {math.exp(self.log_aspect[0]):.3g}..{math.exp(self.log_aspect[1]):.3g})")

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _place_block(self, mask: list[list[bool]], budget: int) -> int:
        """One round; returns how many new patches it masked (0 if no attempt fitted)."""
        rng = self.rng
        for _ in range(_ATTEMPTS):
            # uniform(a, b) with a > b is valid (it just draws in [b, a]); the original relies on it
            # near the end, when the budget is below min_num_patches.
            area = rng.uniform(self.min_num_patches, budget)
            ratio = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(area * ratio))
            w = round(math.sqrt(area / ratio))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                rows = range(top, top + h)
                already = sum(mask[r][c] for r in rows for c in range(left, left + w))
                new = h * w - already
                if 0 < new <= budget:
                    for r in rows:
                        for c in range(left, left + w):
                            mask[r][c] = True
                    return new
        return 0

    def __call__(self) -> torch.Tensor:
        """One mask: (Hm, Wm) bool, True = masked."""
        mask = [[False] * self.width for _ in range(self.height)]
        count = 0
        while count < self.num_masking_patches:
            added = self._place_block(mask, min(self.num_masking_patches - count, self.max_num_patches))
            if added == 0:
                break
            count += added
        return torch.tensor(mask, dtype=torch.bool)


def block_mask_batch(generators: BlockMaskGenerator | Sequence[BlockMaskGenerator],
                     n: int | None = None) -> torch.Tensor:
    """(N, L) bool masks in raster order, one draw per image.

    ``generators`` is one generator per image (each with its own stream), or a single generator
    drawn ``n`` times in a row (the original's per-worker stream).
    """
    if isinstance(generators, BlockMaskGenerator):
        if n is None or n < 1:
            raise ValueError(f"n={n}: with a single generator pass n >= 1, the number of masks to draw")
        masks = [generators() for _ in range(n)]
    else:
        generators = list(generators)
        if not generators:
            raise ValueError("generators is empty; pass one BlockMaskGenerator per image")
        if n is not None and n != len(generators):
            raise ValueError(f"n={n} but {len(generators)} generators were given; drop n or match it")
        shapes = {g.shape for g in generators}
        if len(shapes) != 1:
            raise ValueError(f"generators have different grids {sorted(shapes)}; use one grid per batch")
        masks = [g() for g in generators]
    return torch.stack(masks).flatten(1)


# On a 2x2 grid a block must be 1x1 (the original places blocks strictly narrower than the grid), and about
# 1 draw in 75 places none in its ten tries: a mask of nothing, whose loss is undefined. From 3x3 on, no
# draw in 20,000 came out empty.
SMALLEST_BLOCK_GRID = 3


def window_blockmask_args(k: int) -> dict:
    """Generator arguments for a K×K grid: the original 75 of 196 and 16 per block, scaled by K²/196."""
    if k < SMALLEST_BLOCK_GRID:
        raise ValueError(f"window size K={k} is too small for block masking (about 1 draw in 75 of a 2x2 grid "
                         f"masks nothing); use K >= {SMALLEST_BLOCK_GRID} (e.g. 7)")
    return dict(input_size=k, num_masking_patches=max(1, round(75 * k * k / 196)),
                min_num_patches=max(1, round(16 * k * k / 196)), max_num_patches=None,
                min_aspect=0.3, max_aspect=None)
