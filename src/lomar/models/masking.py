"""Window sampling and in-window masking: the *masking plan*.

A plan says, for every image of a batch, which K×K windows of patches are cut out
(their top-left patch coordinates) and which tokens inside each window are replaced
by the mask token. It is a plain value: sample one with :func:`sample_plan`, or build
one by hand and give it to the model, so any masking can be reproduced exactly.

Windows are drawn independently per image (the paper's description; the original code
shares one draw across the batch, see SPEC §6.1), placed in one of two ways (``placement``):

- ``permutation`` (the original's draw, SPEC §6.1, and the training commands' default): the
  tops and the lefts come from two independent random permutations of the valid rows and
  columns, so no two windows of an image share a top row or a left column, and an image holds
  at most min(H−K+1, W−K+1) windows (the original caps silently; we refuse, §6.2).
- ``distinct`` (this function's default, kept for explicit API use): any n distinct positions
  of the (H−K+1)·(W−K+1) grid, uniformly; allows more windows on small grids.

Everything random comes from one ``torch.Generator``: the same seed gives the same plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from lomar.values import as_sides, is_integer, is_real

__all__ = [
    "MaskingPlan",
    "grid_size",
    "tile_grid",
    "num_masked",
    "window_positions",
    "check_window_request",
    "sample_plan",
    "window_token_index",
    "PLACEMENTS",
    "max_windows",
    "WindowsDoNotFit",
]

PLACEMENTS = ("permutation", "distinct")


def grid_size(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid (Hg, Wg) of an image size (one side or two); raises if the image does not tile into patches."""
    return tile_grid(*as_sides(img_size), patch_size)


def tile_grid(height, width, patch_size: int) -> tuple[int, int]:
    """Patch grid (Hg, Wg) of an image ``height`` x ``width``, e.g. a forward's ``images.shape[-2:]``: a traced
    forward's sides (torch.export, make_fx) are SymInts, kept as they are so that the size is not fixed in the graph.
    Raises if the image does not tile into patches."""
    if patch_size <= 0:
        raise ValueError(f"patch size must be positive, got {patch_size}")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the patch size {patch_size}; "
            f"use a multiple of {patch_size} (e.g. {max(1, height // patch_size) * patch_size})"
        )
    return height // patch_size, width // patch_size


def num_masked(window_size: int, mask_ratio: float) -> int:
    """Masked tokens per window, floor(K·K·ratio); raises unless 0 < M < K·K."""
    if not is_integer(window_size) or window_size < 2:
        raise ValueError(f"window_size must be an integer of at least 2 (a 1x1 window cannot be partly masked), "
                         f"got {window_size!r}")
    tokens = window_size * window_size
    # the printed bounds are rounded inwards, so that both ends really are valid ratios
    lowest, highest = math.ceil(1000 / tokens) / 1000, math.floor(1000 * (tokens - 1) / tokens) / 1000
    if not is_real(mask_ratio) or not math.isfinite(mask_ratio):
        raise ValueError(f"mask_ratio must be a number in [{lowest:.3f}, {highest:.3f}], got {mask_ratio!r}")
    masked = int(math.floor(tokens * mask_ratio + 1e-9))  # 100 * 0.29 is 28.999...: floor the ratio as written
    if not 0 < masked < tokens:
        raise ValueError(
            f"mask_ratio={mask_ratio} masks {masked} of the {tokens} tokens of a {window_size}x{window_size} "
            f"window, and a mask ratio must mask some but not all; pass mask_ratio in [{lowest:.3f}, {highest:.3f}]"
        )
    return masked


class WindowsDoNotFit(ValueError):
    """A window request the patch grid cannot hold, its message with the fix as any other's. For a caller that words
    the fix in its own terms: ``detail`` (what does not fit, without the fix), ``param`` ("window_size" or
    "num_windows") and ``most`` (the most of it that fits); ``others``: the message's other fixes, after the bound;
    ``value``: the value the message names before ``detail`` (None: ``detail`` names it). Built from a message
    alone (``param`` None), as a DataLoader re-raises a worker's error (its type called with the traceback's text),
    it stays a ValueError of this type, that message its only field."""

    def __init__(self, detail: str, param: str | None = None, most: int | None = None, others: str = "",
                 value: int | None = None):
        named = detail if value is None else f"{param}={value}: {detail}"
        super().__init__(named if param is None else f"{named}; pass {param} <= {most}{others} or use a larger image")
        self.detail, self.param, self.most, self.others, self.value = detail, param, most, others, value

    def __reduce__(self):  # pickled whole (a multiprocessing pool's or a future's error): args hold the message alone
        return type(self), (self.detail, self.param, self.most, self.others, self.value)


def window_positions(grid: tuple[int, int], window_size: int) -> tuple[int, int]:
    """Number of valid top-left rows and columns for a K×K window on the grid."""
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(is_integer(g) and g > 0 for g in grid):
        raise ValueError(f"grid must be the patch grid (rows, columns), two positive integers, got {grid!r}; "
                         f"e.g. lomar.models.masking.grid_size(img_size, patch_size)")
    hg, wg = grid
    if window_size > hg or window_size > wg:
        raise WindowsDoNotFit(f"a {window_size}x{window_size} window does not fit the {hg}x{wg} patch grid",
                              "window_size", min(hg, wg), value=window_size)
    return hg - window_size + 1, wg - window_size + 1


def max_windows(grid: tuple[int, int], window_size: int, placement: str = "distinct") -> int:
    """Windows an image can hold: min(rows, cols) of top-left positions for ``permutation``, rows·cols
    for ``distinct``."""
    rows, cols = window_positions(grid, window_size)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} is unknown; pass one of {', '.join(map(repr, PLACEMENTS))}")
    return min(rows, cols) if placement == "permutation" else rows * cols


def check_window_request(grid: tuple[int, int], window_size: int, num_windows: int,
                         mask_ratio: float, placement: str = "distinct") -> int:
    """Validate a sampling request; returns the number of masked tokens per window."""
    if not is_integer(window_size) or window_size < 1:
        raise ValueError(f"window_size must be a positive integer, got {window_size!r}")
    rows, cols = window_positions(grid, window_size)
    if not is_integer(num_windows) or num_windows <= 0:
        raise ValueError(f"num_windows must be a positive integer, got {num_windows!r}")
    most = max_windows(grid, window_size, placement)
    if placement == "permutation" and num_windows > most:
        raise WindowsDoNotFit(
            f"num_windows={num_windows} asks for more {window_size}x{window_size} windows than fit: placed as the "
            f"original places them (no two share a top row or a left column), the {grid[0]}x{grid[1]} patch grid's "
            f"{rows} x {cols} window positions hold at most {most}", "num_windows", most, ", placement='distinct',")
    if num_windows > rows * cols:
        raise WindowsDoNotFit(
            f"num_windows={num_windows} asks for more distinct {window_size}x{window_size} windows than fit: the "
            f"{grid[0]}x{grid[1]} patch grid has only {rows * cols} window positions", "num_windows", rows * cols)
    return num_masked(window_size, mask_ratio)


@dataclass(frozen=True)
class MaskingPlan:
    """Which windows each image contributes and which of their tokens are masked.

    Attributes:
        top_left: (N, n, 2) int64, (row, col) of each window's top-left patch.
        mask: (N, n, K·K) bool, True where the token is replaced by the mask token;
            tokens in raster order inside the window.
        window_size: K.
        checked_grid: the patch grid :meth:`checked` validated the plan for (where it was built, on the
            host), so that a model given it on a GPU skips the checks that would wait for the device.
        masked_range: (fewest, most) masked tokens of a window, counted by :meth:`checked`, so that a
            model sizing a tensor by them does not read them back from the device (:meth:`masked_counts`).

    The training loop checks each batch's plan on the host (:meth:`checked`) and hands it to the model
    untouched. A plan sampled or built by hand is checked by the model it is given to (on a GPU, a wait
    for the device): its tensors may have been edited in place since it was built.
    """

    top_left: torch.Tensor
    mask: torch.Tensor
    window_size: int
    checked_grid: tuple[int, int] | None = field(default=None, compare=False, repr=False)
    masked_range: tuple[int, int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Types only (no data-dependent check): plans are built on the device every training step.
        for name in ("top_left", "mask"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"MaskingPlan.{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        if not is_integer(self.window_size) or self.window_size < 1:
            raise ValueError(f"MaskingPlan.window_size must be a positive integer (K of K×K windows), got "
                             f"{self.window_size!r}")

    @property
    def num_images(self) -> int:
        return self.top_left.shape[0]

    @property
    def num_windows(self) -> int:
        return self.top_left.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskingPlan:
        return replace(self, top_left=self.top_left.to(device, non_blocking=non_blocking),
                       mask=self.mask.to(device, non_blocking=non_blocking))

    def checked(self, grid: tuple[int, int]) -> MaskingPlan:
        """This plan, validated for ``grid`` (:meth:`validate`) and its masked counts taken
        (:attr:`masked_range`); do it on the host, before moving the plan to a GPU."""
        return replace(self, checked_grid=tuple(grid), masked_range=self.validate(grid))

    def as_output(self) -> MaskingPlan:
        """This plan as a model returns it: without :meth:`checked`'s marks, so that given back, after any edit of
        its tensors in place (they are the caller's), it is checked again as a plan built by hand is."""
        return self if self.checked_grid is None else replace(self, checked_grid=None, masked_range=None)

    def masked_counts(self) -> tuple[int, int]:
        """(fewest, most) masked tokens of a window: :attr:`masked_range`, or counted (a wait on a GPU)."""
        if self.masked_range is not None:
            return self.masked_range
        counts = self.mask.sum(-1).flatten()
        return tuple(torch.stack([counts.min(), counts.max()]).tolist()) if counts.numel() else (0, 0)

    def validate(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Raise ValueError unless the plan is well formed for this patch grid; returns the (fewest, most)
        masked tokens of a window. The values are read once, all together: on a GPU a read waits for it."""
        k = self.window_size
        n_img, n_win = (*self.top_left.shape, 0, 0)[:2]  # a tensor of fewer dims is named below, not unpacked
        if self.top_left.shape != (n_img, n_win, 2) or n_win == 0:
            raise ValueError(f"plan.top_left must have shape (N, n, 2) with n >= 1 windows, got "
                             f"{tuple(self.top_left.shape)}")
        if self.mask.shape != (n_img, n_win, k * k):
            raise ValueError(
                f"plan.mask must have shape (N, n, {k * k}) = {(n_img, n_win, k * k)}, "
                f"got {tuple(self.mask.shape)}"
            )
        if self.top_left.dtype.is_floating_point or self.top_left.dtype == torch.bool:
            raise ValueError(f"plan.top_left must hold integers (torch.long), got {self.top_left.dtype}")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"plan.mask must be a bool tensor (True = masked), got {self.mask.dtype}; "
                             f"convert it with mask.bool()")
        rows, cols = window_positions(grid, k)
        if n_img == 0:
            return 0, 0
        counts, tl = self.mask.sum(-1).flatten(), self.top_left.reshape(-1, 2).long()
        fewest, most, lowest, last_row, last_col = torch.stack(
            [counts.min(), counts.max(), tl.min(), tl[:, 0].max(), tl[:, 1].max()]).tolist()
        if most == 0:
            raise ValueError("plan.mask masks no token at all: the loss (over masked tokens) is undefined")
        if lowest < 0 or last_row >= rows or last_col >= cols:
            raise ValueError(
                f"plan has windows outside the {grid[0]}x{grid[1]} grid: top-left rows must be in "
                f"[0, {rows - 1}] and columns in [0, {cols - 1}] for {k}x{k} windows (a plan counts patches, not "
                f"pixels: sample_plan's grid is the images' size over the patch size, here {tuple(grid)})"
            )
        return fewest, most

    def for_batch(self, images: torch.Tensor, window_size: int, grid: tuple[int, int]) -> MaskingPlan:
        """This plan on the images' device, checked against a model's K and the batch (images (N, C, H, W) on a
        ``grid`` of patches). The data-dependent checks run eagerly only: compiled steps get the masker's plans.
        Models call it unbound, ``MaskingPlan.for_batch(plan, ...)``, so that a plan of another type is named."""
        if not isinstance(self, MaskingPlan):
            raise TypeError(f"plan must be a lomar.MaskingPlan (or None to sample one), got {type(self).__name__}; "
                            f"build it with lomar.MaskingPlan(top_left, mask, window_size) or lomar.sample_plan")
        if self.window_size != window_size:
            raise ValueError(f"plan has {self.window_size}x{self.window_size} windows but the model uses "
                             f"{window_size}x{window_size}")
        if self.top_left.ndim != 3:
            self.validate(grid)  # names the shape of a top_left with another number of dims
        if self.num_images != images.shape[0]:
            raise ValueError(f"plan is for {self.num_images} images but the batch has {images.shape[0]}")
        if not torch.compiler.is_compiling() and self.checked_grid != tuple(grid):
            return self.checked(grid).to(images.device)  # on a GPU each check is a wait for the device
        return self.to(images.device)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One row per (image, window): image index (R,), top-left (R, 2), mask (R, K·K)."""
        n_img, n_win = self.top_left.shape[:2]
        image = torch.arange(n_img, device=self.top_left.device).repeat_interleave(n_win)
        return image, self.top_left.reshape(-1, 2), self.mask.reshape(n_img * n_win, -1)


def window_token_index(top_left: torch.Tensor, window_size: int, grid_width: int) -> torch.Tensor:
    """Raster grid index of every window token: (..., 2) top-left -> (..., K·K)."""
    offs = torch.arange(window_size, device=top_left.device)
    rows = top_left[..., 0, None, None] + offs[:, None]  # (..., K, 1)
    cols = top_left[..., 1, None, None] + offs[None, :]  # (..., 1, K)
    return (rows * grid_width + cols).flatten(-2)


# Random draws with a generator cannot be traced with symbolic shapes (torch.compile recompiles
# dynamically once a model sees a second image size): sampling always runs eagerly.
@torch.compiler.disable
def sample_plan(
    num_images: int,
    grid: tuple[int, int],
    window_size: int = 7,
    num_windows: int = 4,
    mask_ratio: float = 0.8,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    placement: str = "distinct",
) -> MaskingPlan:
    """Sample n windows per image, placed per ``placement`` (module docstring), and M masked tokens each.

    The draw happens on the generator's device (CPU when none is given) and the plan is
    then moved to ``device``.
    """
    if not is_integer(num_images) or num_images <= 0:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    masked = check_window_request(grid, window_size, num_windows, mask_ratio, placement)
    window_size, num_windows, num_images = int(window_size), int(num_windows), int(num_images)  # Python ints
    rows, cols = window_positions(grid, window_size)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if placement == "permutation":
        # The first n of a random permutation = the n smallest of i.i.d. uniform keys, in key order.
        tops = torch.rand(num_images, rows, generator=generator, device=gen_device)
        lefts = torch.rand(num_images, cols, generator=generator, device=gen_device)
        top_left = torch.stack((tops.topk(num_windows, dim=1, largest=False).indices,
                                lefts.topk(num_windows, dim=1, largest=False).indices), dim=-1)
    else:
        # n distinct positions per image: the n smallest of i.i.d. uniform keys.
        keys = torch.rand(num_images, rows * cols, generator=generator, device=gen_device)
        pos = keys.topk(num_windows, dim=1, largest=False).indices  # (N, n)
        top_left = torch.stack((pos // cols, pos % cols), dim=-1)
    # Exactly M masked tokens per window: the M smallest of K·K uniform keys.
    tokens = window_size * window_size
    keys = torch.rand(num_images, num_windows, tokens, generator=generator, device=gen_device)
    chosen = keys.topk(masked, dim=-1, largest=False).indices
    mask = torch.zeros(num_images, num_windows, tokens, dtype=torch.bool, device=gen_device)
    mask.scatter_(-1, chosen, True)
    plan = MaskingPlan(top_left, mask, window_size)
    return plan.to(device) if device is not None else plan
