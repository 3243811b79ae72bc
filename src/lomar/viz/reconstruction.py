"""Reconstruction figures: original | windows | masked input | reconstruction (paper Fig. 5).

Figures are plain :class:`matplotlib.figure.Figure` objects rendered by Agg on save: no pyplot,
so no global backend or figure registry is touched.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lomar.checkpoints.io import atomic_write_bytes
from lomar.data.transforms import denormalize
from lomar.models.lomar import LoMaR
from lomar.models.mae import MAE
from lomar.models.mae_window import MAEWindow
from lomar.models.masking import MaskingPlan, num_masked, window_token_index
from lomar.models.modes import eval_mode
from lomar.models.objective import patchify, unpatchify

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["reconstruct", "reconstruction_figure", "reconstruction_snapshot", "snapshot_path", "snapshot_step",
           "settle_latest", "draw_reconstruction",
           "save_figure", "FIGURE_FORMATS", "image_rows", "masking_note"]

_DIM = 0.35  # brightness of the parts of the image no window covers
_PNG_LEVEL = 1  # zlib level of a saved PNG
_ROW_GAP = 0.0286  # between rows of images, a fraction of their height: the gap constrained layout leaves


def _unnormalize_pred(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Predictions of per-patch-normalised pixels -> the image's (normalised) pixel space."""
    if not norm_pix:
        return pred
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
    return pred * std + mean


def _compiled_module(model):
    """The module ``torch.compile`` wrapped (its OptimizedModule is no LoMaR or MAE), else ``model``: a figure's one
    forward gains nothing from the compiled graph."""
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, seed: int = 0,
                plan: MaskingPlan | None = None) -> dict[str, torch.Tensor]:
    """Run a LoMaR or MAE model once and paint its output back into pixel space.

    images (N, 3, H, W) normalised -> dict of (N, 3, H, W) pixels in [0, 1]:
    ``original``, ``masked`` (masked patches grey, uncovered area dimmed), ``reconstruction``
    (visible patches from the input, masked ones predicted), and ``loss`` (the model's, a 0-d tensor); LoMaR also
    gives ``plan``. ``plan`` (LoMaR only) fixes the windows and masks; otherwise they are drawn from ``seed``.
    Images the model does not take (no tensor, another layout, dtype or device, a side not a multiple of the patch)
    are refused as the model's forward refuses them.
    """
    model = _compiled_module(model)
    if not isinstance(model, (LoMaR, MAEWindow, MAE)):
        raise TypeError(f"cannot draw reconstructions for {type(model).__name__}: pass a LoMaR or MAE model (such as "
                        f"lomar.load_model of a pretraining checkpoint), not an encoder, which predicts no pixels")
    with eval_mode(model):
        p = model.config.patch_size
        grid = model.encoder.image_grid(images)  # first: patchify below would fail on them in torch's words
        n = images.shape[0]
        target = patchify(images, p)  # (N, L, p·p·3)
        gen = torch.Generator(device=images.device).manual_seed(seed)
        coverage = torch.zeros(n, grid[0] * grid[1], dtype=torch.bool, device=images.device)
        masked = torch.zeros_like(coverage)
        painted = target.clone()
        out: dict = {}
        if isinstance(model, (LoMaR, MAEWindow)):  # both predict the pixels of every window token
            result = model(images, plan=plan.to(images.device) if plan is not None else None, generator=gen)
            plan = result.plan
            image, top_left, mask = plan.flat()
            index = window_token_index(top_left, plan.window_size, grid[1])  # (R, K·K)
            pixels = _unnormalize_pred(result.pred.float(), target[image[:, None], index], model.norm_pix_loss)
            visible = torch.zeros_like(coverage)
            for r in range(index.shape[0]):  # windows may overlap: later ones paint over earlier ones
                i, tok, m = image[r], index[r], mask[r]
                coverage[i, tok] = True
                visible[i, tok[~m]] = True
                painted[i, tok[m]] = pixels[r, m].to(painted.dtype)
            # A patch the model saw in any window is shown as seen, not as predicted.
            masked = coverage & ~visible
            painted[visible] = target[visible]
            out["plan"] = plan
        else:
            noise = torch.rand(n, grid[0] * grid[1], generator=gen, device=images.device)
            result = model(images, noise=noise)
            masked = result.mask.bool()
            coverage[:] = True
            pixels = _unnormalize_pred(result.pred.float(), target, model.norm_pix_loss)
            painted[masked] = pixels[masked].to(painted.dtype)

    def to_pixels(patches: torch.Tensor, keep: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
        img = denormalize(unpatchify(patches, p, grid))
        factor = unpatchify(keep[..., None].float().expand(-1, -1, p * p * 3), p, grid)
        shade = unpatchify(grey[..., None].float().expand(-1, -1, p * p * 3), p, grid)
        img = img * (_DIM + (1 - _DIM) * factor)
        return img * (1 - shade) + 0.5 * shade

    out["original"] = denormalize(images)
    out["masked"] = to_pixels(target, coverage, masked)
    out["reconstruction"] = to_pixels(painted, coverage, torch.zeros_like(masked))
    out["loss"] = result.loss.detach()
    return out


def reconstruction_figure(model, images: torch.Tensor, path: str | Path, seed: int = 0,
                          title: str | None = None, plan: MaskingPlan | None = None) -> Path:
    """Write a PNG, one row per image: original | windows (LoMaR's) | masked input | reconstruction.

    images: (N, 3, H, W) normalised; ``plan``: optional fixed LoMaR windows/masks for them.
    """
    return save_figure(draw_reconstruction(model, images, seed, title, plan), path, dpi=80)


def snapshot_path(out: str | Path, step: int) -> Path:
    """The numbered figure :func:`reconstruction_snapshot` writes at ``step``: ``OUT/reconstruction-{step:06d}.png``."""
    return Path(out) / f"reconstruction-{step:06d}.png"


def snapshot_step(name: str) -> int | None:
    """The step of a :func:`snapshot_path` name (``reconstruction-000402.png``); None for another name."""
    digits = name.removeprefix("reconstruction-").removesuffix(".png")
    return int(digits) if digits != name and digits.isdigit() and name == snapshot_path("", int(digits)).name else None


def reconstruction_snapshot(model, images: torch.Tensor, out: str | Path, step: int, seed: int = 0,
                            title: str | None = None, draw=None) -> Path:
    """A training run's figure at ``step``: ``OUT/reconstruction-{step:06d}.png`` and the same
    picture as ``OUT/reconstruction.png`` (the latest), so the first and the last can be compared.
    The same ``seed`` and images at every step show the same windows and masks. ``draw``: the
    method's figure writer, ``draw(model, images, path, seed=, title=)`` (default
    :func:`reconstruction_figure`). Returns the numbered path. images: (N, 3, H, W) normalised."""
    out = Path(out)
    numbered = Path((draw or reconstruction_figure)(model, images, snapshot_path(out, step), seed=seed, title=title))
    atomic_write_bytes(out / "reconstruction.png", numbered.read_bytes())
    return numbered


def settle_latest(out: str | Path, step: int) -> bool:
    """Make ``OUT/reconstruction.png`` (the latest) the newest numbered figure at or before ``step`` where it holds
    another: a kill between :func:`reconstruction_snapshot`'s two writes left the step before's, a rewind to an earlier
    checkpoint a dropped step's; where there is none (a sharded run draws figures only when it stops or ends), no
    latest. Whether it was written or removed. A compare of two files, and a listing of the folder only where ``step``
    has no numbered figure: no drawing."""
    numbered, latest = snapshot_path(out, step), Path(out) / "reconstruction.png"
    try:
        drawn = numbered.read_bytes()
    except FileNotFoundError:
        earlier = [(n, path) for path in Path(out).glob("reconstruction-*.png")
                   if (n := snapshot_step(path.name)) is not None and n < step]
        if not earlier:
            try:
                latest.unlink()
            except FileNotFoundError:
                return False
            return True
        drawn = max(earlier)[1].read_bytes()
    try:
        if latest.read_bytes() == drawn:
            return False
    except FileNotFoundError:
        pass
    atomic_write_bytes(latest, drawn)
    return True


def draw_reconstruction(model, images: torch.Tensor, seed: int = 0, title: str | None = None,
                        plan: MaskingPlan | None = None) -> Figure:
    """The figure :func:`reconstruction_figure` writes; images: (N, 3, H, W) normalised. The
    caption below says that a norm-pix model's predictions are shown rescaled with each true
    patch's mean and std."""
    model = _compiled_module(model)  # its type names the figure and says how it masks
    parts = reconstruct(model, images, seed, plan=plan)
    p = model.config.patch_size
    # matplotlib is slow to import: only when a figure is drawn
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    # constrained layout reserves the title's height above the column headers at any row count
    fig = Figure(figsize=(12, 3 * images.shape[0] + 1.1), layout="constrained")
    plan = parts.get("plan")
    # MAE masks the whole image: a windows column would repeat the original with nothing drawn on it
    views = {"original": parts["original"], **({"sampled windows": parts["original"]} if plan is not None else {}),
             "masked input": parts["masked"], "reconstruction": parts["reconstruction"]}
    frames = image_rows(fig, {name: view.permute(0, 2, 3, 1) for name, view in views.items()})
    side = plan.window_size * p if plan is not None else 0  # every window of a plan is the same size
    for row, windows in enumerate(plan.top_left.tolist() if plan is not None else []):
        frame = frames[row, 1]
        x, y = frame.get_xy()
        for top, left in windows:
            # clipped to its image, as a panel axes clips it
            frame.axes.add_patch(Rectangle((x + left * p, y + top * p), side, side, fill=False, edgecolor="yellow",
                                           linewidth=1.5, clip_path=frame))
    fig.suptitle(f"{title or f'{type(model).__name__} reconstruction'} (loss {parts['loss']:.3f})\n"
                 f"{masking_note(model, images.shape[-2:], plan)}")
    fig.supxlabel(_caption(model.norm_pix_loss, plan is not None), fontsize=9)
    return fig


def masking_note(model, size: tuple[int, int], plan: MaskingPlan | None = None) -> str:
    """How a LoMaR / MAE model masks an image of ``size`` (H, W) pixels, in the words of a figure's title: the
    windows, their side and the tokens masked in each, or MAE's share of the whole image. ``plan``: the windows
    and masks the figure drew, which a caller may have given otherwise than the model samples them."""
    if isinstance(model, (LoMaR, MAEWindow)):
        k, count, own = model.window_size, model.num_windows, num_masked(model.window_size, model.mask_ratio)
        counts = [own]
        if plan is not None:
            count, counts = plan.num_windows, sorted(set(plan.mask.sum(-1).flatten().tolist()))
        masked = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        ratio = f" (mask ratio {model.mask_ratio:g})" if counts == [own] else ""
        return f"{count} window{'s' if count > 1 else ''} of {k}x{k} patches, {masked} of each window's {k * k} " \
               f"masked{ratio}"
    p = model.config.patch_size
    length = (size[0] // p) * (size[1] // p)
    kept = int(length * (1 - model.mask_ratio))  # as MAE keeps them
    return f"{length - kept} of the image's {length} patches masked (mask ratio {model.mask_ratio:g})"


def image_rows(fig: Figure, columns: dict[str, torch.Tensor], **imshow):
    """One row per image, one titled column per entry of ``columns`` (name: images (N, H, W, C)), each image framed,
    no ticks; returns the (N, columns) frames: Rectangles around the images, in their column axes' coordinates, the
    first column's pixels (every image is drawn at the first column's size, a token map's cells stretched to it).

    A column is one axes holding its N images, a gap of :data:`_ROW_GAP` of an image's height between them: a panel
    axes each costs several times more to build and lay out than its image costs to draw."""
    # matplotlib is slow to import: only when a figure is drawn
    from matplotlib import rcParams
    from matplotlib.patches import Rectangle

    n, height, width = next(iter(columns.values())).shape[:3]
    tops = [row * height * (1 + _ROW_GAP) for row in range(n)]
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    frames = []
    for ax, (name, view) in zip(axes, columns.items()):
        ax.set_title(name)
        # no ticks (hidden axes are also left out of the layout's measuring), and each image gets its own frame
        # where a panel axes has its spines
        ax.xaxis.set_visible(False)
        ax.yaxis.set_visible(False)
        ax.set_frame_on(False)
        for row, top in enumerate(tops):
            ax.imshow(view[row].cpu().numpy(), extent=(-0.5, width - 0.5, top + height - 0.5, top - 0.5), **imshow)
        ax.set(xlim=(-0.5, width - 0.5), ylim=(tops[-1] + height - 0.5, -0.5))
        frames.append([ax.add_patch(Rectangle((-0.5, top - 0.5), width, height, fill=False, clip_on=False,
                                              edgecolor=rcParams["axes.edgecolor"],
                                              linewidth=rcParams["axes.linewidth"], zorder=2.5))
                       for top in tops])
    return np.array(frames, dtype=object).T


def _caption(norm_pix: bool, windows: bool) -> str:
    """What the reconstruction column shows: a norm-pix model predicts each patch's pixels up to
    its mean and std, so the figure borrows those two numbers from the true patch."""
    masked = ("masked patches show the prediction rescaled with the true patch's mean and std (the model "
              "predicts per-patch normalised pixels)" if norm_pix else "masked patches show the prediction")
    text = f"reconstruction: {masked}; visible patches show the input"
    return textwrap.fill(text + ("; dimmed: outside every window" if windows else ""), 120, break_on_hyphens=False)


FIGURE_FORMATS = (".png", ".pdf", ".svg")  # what a figure's file name may end in


def save_figure(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Lay out (unless the figure has its own layout engine) and write atomically: a reader never
    sees half a file. The format follows the name: PNG, or PDF / SVG (vector, for papers)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        raise ValueError(f"figure {path}: name it .png, .pdf or .svg (got {suffix or 'no suffix'!r})")
    engine = fig.get_layout_engine()
    if engine is None:
        fig.tight_layout()
    buffer = io.BytesIO()
    # zlib's fastest level: the same pixels in a somewhat larger file, written several times faster
    pil = {"compress_level": _PNG_LEVEL}
    if suffix != ".png":
        fig.savefig(buffer, dpi=dpi, format=suffix[1:])
    elif engine is None:
        fig.savefig(buffer, dpi=dpi, format="png", pil_kwargs=pil)
    else:
        _print_laid_out_png(fig, engine, dpi, buffer, pil)
    return atomic_write_bytes(path, buffer.getvalue())


def _print_laid_out_png(fig: Figure, engine, dpi: int, buffer: io.BytesIO, pil: dict) -> None:
    """``fig``, which has a layout engine, as a PNG into ``buffer``, drawn once. savefig lays out such a figure by
    drawing it once unseen (every image resampled, every text laid out) before the real draw: the engine alone, run
    with the Agg renderer at the saving dpi as savefig's draw runs it, places everything where that draw does."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib is slow to import: only when saving

    canvas = FigureCanvasAgg(fig)  # the figure's canvas from here on, as savefig's own PNG canvas
    own_dpi = fig.get_dpi()
    try:
        fig.set_dpi(dpi)
        engine.execute(fig)
        fig.set_layout_engine("none")  # laid out above: the draw keeps those positions
        canvas.print_png(buffer, pil_kwargs=pil)
    finally:
        fig.set_layout_engine(engine)
        fig.set_dpi(own_dpi)

