"""Window geometry for every method: ``--windows N`` local K×K windows, or one global window.

Every method draws a :class:`~lomar.models.masking.MaskingPlan` (window top-left + in-window mask).
``--windows 0`` is one window covering the whole (square) patch grid, so a global method and its
windowed variant share one code path. In-window masks are either random (exactly
floor(K²·ratio) masked, :func:`~lomar.models.masking.sample_plan`) or BEiT's blockwise masks scaled
to the window (:func:`with_block_masks`, the original 75 of 196 patches on a 14×14 grid).
"""

from __future__ import annotations

import random

import torch

from lomar.models.blockmask import BlockMaskGenerator, window_blockmask_args
from lomar.models.masking import MaskingPlan, sample_plan
from lomar.window_counts import GLOBAL_WINDOWS

__all__ = ["window_geometry", "with_block_masks", "sample_method_plan"]


def window_geometry(grid: tuple[int, int], window_size: int, windows: int) -> tuple[int, int]:
    """(K, windows per image): ``windows == 0`` is one window of the whole grid, which must be square."""
    if windows == GLOBAL_WINDOWS:
        if grid[0] != grid[1]:
            raise ValueError(f"windows=0 (one global window) needs a square patch grid, got {grid[0]}x{grid[1]}; "
                             f"use a square image size or pass windows=N (N local windows)")
        return grid[0], 1
    return window_size, windows


def with_block_masks(plan: MaskingPlan, rng: random.Random) -> MaskingPlan:
    """The plan's windows with BEiT blockwise in-window masks (75/196 of K², blocks >= 16/196 of K²).

    ``rng`` is consumed in the original's order (one mask per window, image-major).
    """
    k = plan.window_size
    generator = BlockMaskGenerator(**window_blockmask_args(k), rng=rng)
    n_img, n_win = plan.top_left.shape[:2]
    masks = torch.stack([generator().flatten() for _ in range(n_img * n_win)])
    return MaskingPlan(plan.top_left, masks.view(n_img, n_win, k * k).to(plan.mask.device), k)


@torch.compiler.disable  # as lomar.models.masking.sample_plan: random draws run eagerly under torch.compile
def sample_method_plan(num_images: int, grid: tuple[int, int], window_size: int, windows: int,
                       mask_ratio: float | None, generator: torch.Generator | None = None,
                       placement: str = "distinct") -> MaskingPlan:
    """Windows per :func:`window_geometry` placed per ``placement`` (:mod:`lomar.models.masking`); random
    in-window masking at ``mask_ratio``, or blockwise masking (``mask_ratio=None``) with a
    ``random.Random`` seeded from ``generator``."""
    k, n = window_geometry(grid, window_size, windows)
    if mask_ratio is not None:
        return sample_plan(num_images, grid, k, n, mask_ratio, generator=generator, placement=placement)
    # Window positions come from the common sampler; 0.5 is only a placeholder for its random mask.
    plan = sample_plan(num_images, grid, k, n, 0.5, generator=generator, placement=placement)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return with_block_masks(plan, random.Random(seed))
