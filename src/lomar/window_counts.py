"""The number of windows per image for ``--windows auto``; imports no torch.

**The paper's counts** (:data:`PAPER_COUNTS`, used exactly): ViT-B/16 samples 4 windows at 224 px,
6 at 384 and 9 at 448 (14×14, 24×24, 28×28 patch grids); ViT-B/8 at 224 px (a 28×28 grid) uses 4,
like B/16 at 224 -- the count follows the image, not the grid, there. These are 7×7 windows. The
window-size ablation (Table 6, B/16 at 224 px) pairs other sizes with other counts
(:data:`PAPER_WINDOW_SIZES`: 5×5: 8, 9×9: 3, 11×11: 2, 14×14: 1), keeping the patches the windows
cover near the grid's 196. The paper states no other configuration (its iNaturalist runs finetune
the ImageNet-pretrained models and give no count of their own).

**A rule where the paper is silent**: the three B/16 points are not proportional to the grid area
(area scaling from 224 would give 12 at 384), so the rule interpolates linearly in grid area between
them; below 14×14 and above 28×28 the count scales with the area from the nearest B/16 point. That
is the count of 7×7 windows: K×K windows take 49/K² of it, as in Table 6 (this gives Table 6's
counts except at 9×9: 2 for the paper's 3). The result is rounded half up, at least 1, and at most
the windows the grid holds (with the original's placement, min(H−K+1, W−K+1); see
:mod:`lomar.models.masking`).
"""

from __future__ import annotations

import math

from lomar.values import as_sides

__all__ = ["PAPER_COUNTS", "PAPER_WINDOW_SIZES", "PAPER_GRID_AREAS", "PAPER_POINTS", "paper_windows", "windows_source",
           "parse_windows", "GLOBAL_WINDOWS", "WINDOWS_RULE"]

GLOBAL_WINDOWS = 0  # --windows 0 / global: one window covering the whole (square) grid

PAPER_WINDOW = 7  # the window size of PAPER_COUNTS, and the paper's default
# (patch size, square image size in px) -> windows per image, as the paper reports them (7x7 windows)
PAPER_COUNTS = {(16, 224): 4, (16, 384): 6, (16, 448): 9, (8, 224): 4}
# window size K -> windows per image at ABLATION, (patch size, image size in px) of the paper's Table 6
ABLATION = (16, 224)
PAPER_WINDOW_SIZES = {5: 8, 7: 4, 9: 3, 11: 2, 14: 1}
# the B/16 points by grid area: 196: 4, 576: 6, 784: 9
PAPER_GRID_AREAS = {(size // patch) ** 2: n for (patch, size), n in PAPER_COUNTS.items() if patch == 16}


def _paper_points() -> str:
    """Every count the paper reports, as a message says them: '7x7 windows, B/16: 4 at 224 px, 6 at 384, ...'."""
    by_patch: dict[int, list[str]] = {}
    for (patch, size), n in PAPER_COUNTS.items():
        by_patch.setdefault(patch, []).append(f"{n} at {size}")
    by_patch[next(iter(by_patch))][0] += " px"  # the unit once, on the first size
    counts = "; ".join(f"B/{patch}: {', '.join(points)}" for patch, points in by_patch.items())
    sizes = ", ".join(f"{k}x{k}: {n}" for k, n in PAPER_WINDOW_SIZES.items() if k != PAPER_WINDOW)
    return f"{PAPER_WINDOW}x{PAPER_WINDOW} windows, {counts}; B/{ABLATION[0]} at {ABLATION[1]} px, {sizes}"


PAPER_POINTS = _paper_points()  # for a help or a message: every count the paper reports
WINDOWS_RULE = (f"not a configuration the paper reports ({PAPER_POINTS}): linear in grid area between the B/16 "
                "points, proportional to grid area outside, times 49/K² for KxK windows, rounded, within the grid")


def windows_source(img_size: int | tuple[int, int], patch_size: int = 16, window_size: int | None = None) -> str:
    """'paper' when the paper reports the count of this configuration (``window_size`` None: 7), else 'rule'."""
    return "rule" if _paper_count(img_size, patch_size, window_size) is None else "paper"


def _paper_count(img_size: int | tuple[int, int], patch_size: int, window_size: int | None) -> int | None:
    h, w = as_sides(img_size)
    k = PAPER_WINDOW if window_size is None else window_size
    if h != w:
        return None
    if k == PAPER_WINDOW:
        return PAPER_COUNTS.get((patch_size, h))
    return PAPER_WINDOW_SIZES.get(k) if (patch_size, h) == ABLATION else None


def paper_windows(img_size: int | tuple[int, int], patch_size: int = 16, window_size: int | None = None,
                  placement: str = "permutation") -> int:
    """Windows per image for an image of ``img_size`` px (H, W or square) and K×K windows
    (``window_size``; None: 7×7, uncapped): the paper's count where it reports one
    (:data:`PAPER_COUNTS`, :data:`PAPER_WINDOW_SIZES`), else the rule of the module docstring, at
    most the windows a K×K window can take: min(Hg−K+1, Wg−K+1) for the original's ``permutation``
    placement, (Hg−K+1)·(Wg−K+1) for ``distinct``.
    """
    h, w = as_sides(img_size)
    hg, wg = h // patch_size, w // patch_size
    paper = _paper_count((h, w), patch_size, window_size)
    if paper is not None:
        return paper
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
    if window_size:
        exact *= PAPER_WINDOW ** 2 / window_size ** 2
    count = max(1, math.floor(exact + 0.5))
    if window_size is not None and 0 < window_size <= min(hg, wg):
        rows, cols = hg - window_size + 1, wg - window_size + 1
        count = min(count, min(rows, cols) if placement == "permutation" else rows * cols)
    return count


def parse_windows(value: int | str) -> int:
    """``--windows`` value: a count >= 0, or 'global' (= 0); the caller reads 'auto' first."""
    if isinstance(value, str) and value.strip().lower() == "global":
        return GLOBAL_WINDOWS
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--windows {value!r} is not a window count, 'auto' or 'global'; pass --windows auto for "
                         f"the paper's counts (what lomar bench calls 'paper'), a count such as 4, or 0 for the whole "
                         f"image") from None
    if count < 0:
        raise ValueError(f"--windows {count} is negative; pass a count >= 1, or 0 (global) for the whole image")
    return count
