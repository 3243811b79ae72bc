"""The paper's rule for the number of windows per image (``--windows auto``); imports no torch.

The paper samples 4 windows at 224 px, 6 at 384 and 9 at 448 (patch 16: 14×14, 24×24 and 28×28
patch grids). Those three points are not proportional to the grid area (area scaling from 224
would give 12 at 384), so the rule reproduces them exactly and interpolates linearly in grid area
between them; below 14×14 and above 28×28 the count scales with the area from the nearest paper
point. The result is rounded half up, at least 1, and at most the window positions the grid has.
"""

from __future__ import annotations

import math

__all__ = ["PAPER_WINDOWS", "PAPER_GRID_AREAS", "paper_windows", "parse_windows", "GLOBAL_WINDOWS", "WINDOWS_RULE"]

GLOBAL_WINDOWS = 0  # --windows 0 / global: one window covering the whole (square) grid

PAPER_WINDOWS = {224: 4, 384: 6, 448: 9}  # image size (patch 16) -> windows per image
PAPER_GRID_AREAS = {(size // 16) ** 2: n for size, n in PAPER_WINDOWS.items()}  # 196: 4, 576: 6, 784: 9
WINDOWS_RULE = ("the paper's 4 at 224 px, 6 at 384, 9 at 448 (14x14, 24x24, 28x28 patch grids), linear "
                "in grid area between them, proportional to grid area outside, rounded, within the grid")


def paper_windows(img_size: int | tuple[int, int], patch_size: int = 16, window_size: int | None = None) -> int:
    """Windows per image by the paper's rule for an image of ``img_size`` px (H, W or square).

    ``window_size`` (K): cap the count at the (Hg−K+1)·(Wg−K+1) distinct K×K positions.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    hg, wg = h // patch_size, w // patch_size
    area = hg * wg
    points = sorted(PAPER_GRID_AREAS.items())
    (a0, n0), (a1, _) = points[0], points[-1]
    if area <= a0:
        exact = n0 * area / a0
    elif area >= a1:
        exact = PAPER_GRID_AREAS[a1] * area / a1
    else:
        (lo, n_lo), (hi, n_hi) = next((p, q) for p, q in zip(points, points[1:]) if p[0] <= area <= q[0])
        exact = n_lo + (n_hi - n_lo) * (area - lo) / (hi - lo)
    count = max(1, math.floor(exact + 0.5))
    if window_size is not None and 0 < window_size <= min(hg, wg):
        count = min(count, (hg - window_size + 1) * (wg - window_size + 1))
    return count


def parse_windows(value: int | str) -> int:
    """``--windows`` value: a count >= 0, or 'global' (= 0)."""
    if isinstance(value, str) and value.strip().lower() == "global":
        return GLOBAL_WINDOWS
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--windows {value!r} is neither a window count nor 'global'; "
                         f"pass e.g. --windows 4, or --windows 0 for the whole image") from None
    if count < 0:
        raise ValueError(f"--windows {count} is negative; pass a count >= 1, or 0 (global) for the whole image")
    return count
