"""BEiT's reconstruction-style figure: the tokenizer's token map against the model's predictions.

Each token id gets a fixed colour (a seeded random palette), so equal colours in the "true" and
"predicted" maps mean a correct prediction. Only masked tokens are predicted; the others are
shown dimmed with their true colour.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lomar.data.transforms import denormalize
from lomar.models.masking import window_token_index
from lomar.models.modes import eval_mode
from lomar.viz.reconstruction import image_rows, save_figure

__all__ = ["token_maps", "token_figure", "draw_tokens"]

_DIM = 0.35  # brightness of the cells that were not masked (not predicted)
_CORRECT = torch.tensor([0.1, 0.7, 0.2])
_WRONG = torch.tensor([0.85, 0.15, 0.1])
_UNMASKED = torch.tensor([0.9, 0.9, 0.9])


@torch.no_grad()
def token_maps(model, images: torch.Tensor, seed: int = 0) -> dict:
    """A :class:`~lomar.models.beit_pretrain.BEiTPretrain` on ``images`` (N, 3, H, W) normalised →
    ``true`` (N, Gh, Gw) ids, ``predicted`` (N, Gh, Gw) ids (−1 where not predicted), ``masked``
    (N, Gh, Gw) bool, ``accuracy`` over masked tokens, ``loss`` and the ``plan``."""
    with eval_mode(model):
        out = model(images, generator=torch.Generator(device=images.device).manual_seed(seed))
    grid = model.config.grid
    n = images.shape[0]
    true = model.tokens(images)  # (N, L)
    image, top_left, mask = out.plan.flat()
    index = window_token_index(top_left, out.plan.window_size, grid[1])  # (R, K²)
    rows = image[:, None].expand_as(index)[mask]
    cells = index[mask]
    predicted = torch.full_like(true, -1)
    masked = torch.zeros_like(true, dtype=torch.bool)
    # Overlapping windows: the last prediction for a cell is shown, as the pixel figure does.
    predicted[rows, cells] = out.logits.argmax(-1)
    masked[rows, cells] = True
    accuracy = float((out.logits.argmax(-1) == out.targets).float().mean())
    shape = (n, *grid)
    return {"true": true.view(shape), "predicted": predicted.view(shape), "masked": masked.view(shape),
            "accuracy": accuracy, "loss": float(out.loss), "plan": out.plan}


def token_figure(model, images: torch.Tensor, path: str | Path, seed: int = 0, title: str | None = None) -> Path:
    """PNG of :func:`draw_tokens`, one row per image: image | true tokens | predicted tokens (masked
    cells) | correct (green) / wrong (red). images: (N, 3, H, W) normalised."""
    return save_figure(draw_tokens(model, images, seed, title), path, dpi=80)


def draw_tokens(model, images: torch.Tensor, seed: int = 0, title: str | None = None):
    """The figure :func:`token_figure` writes (a :class:`matplotlib.figure.Figure`), with a legend
    below the rows for the colours of the last column and what the token colours mean."""
    maps = token_maps(model, images, seed)
    colours = torch.rand(model.config.vocab_size, 3, generator=torch.Generator().manual_seed(12345)) * 0.8 + 0.2
    true, predicted, masked = maps["true"].cpu(), maps["predicted"].cpu(), maps["masked"].cpu()
    dim = torch.where(masked[..., None], 1.0, _DIM)
    views = {
        "image": denormalize(images).permute(0, 2, 3, 1).cpu(),
        "true tokens": colours[true],
        "predicted (masked)": torch.where(masked[..., None], colours[predicted.clamp_min(0)], colours[true]) * dim,
        "correct / wrong": torch.where((predicted == true)[..., None], _CORRECT, _WRONG) * masked[..., None]
                           + (~masked[..., None]) * _UNMASKED,
    }
    # matplotlib is slow to import: only when a figure is drawn
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(12, 3 * images.shape[0] + 1.4), layout="constrained")
    image_rows(fig, views, interpolation="nearest")
    handles = [Patch(color=_CORRECT.tolist(), label="correct prediction"),
               Patch(color=_WRONG.tolist(), label="wrong prediction"),
               Patch(color=_UNMASKED.tolist(), label="not masked (not predicted)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9, title_fontsize=9,
               title="token maps: one fixed colour per token id, the same in the true and the predicted map; "
                     "dimmed cells are not masked (true token shown)")
    fig.suptitle(f"{title or 'BEiT token prediction'}\naccuracy {maps['accuracy']:.1%} on masked tokens, "
                 f"loss {maps['loss']:.3f}")
    return fig
