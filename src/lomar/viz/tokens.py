"""BEiT's reconstruction-style figure: the tokenizer's token map against the model's predictions.

Each token id gets a fixed colour (a seeded random palette), so equal colours in the "true" and
"predicted" maps mean a correct prediction. Only masked tokens are predicted; the others are
shown dimmed with their true colour.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lomar.models.masking import window_token_index

__all__ = ["token_maps", "token_figure"]


@torch.no_grad()
def token_maps(model, images: torch.Tensor, seed: int = 0) -> dict:
    """A :class:`~lomar.models.beit_pretrain.BEiTPretrain` on ``images`` (N, 3, H, W) normalised →
    ``true`` (N, Gh, Gw) ids, ``predicted`` (N, Gh, Gw) ids (−1 where not predicted), ``masked``
    (N, Gh, Gw) bool, ``accuracy`` over masked tokens, ``loss`` and the ``plan``."""
    was_training = model.training
    model.eval()
    try:
        out = model(images, generator=torch.Generator(device=images.device).manual_seed(seed))
    finally:
        model.train(was_training)
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


def _palette(vocab: int) -> torch.Tensor:
    return torch.rand(vocab, 3, generator=torch.Generator().manual_seed(12345)) * 0.8 + 0.2


def token_figure(model, images: torch.Tensor, path: str | Path, seed: int = 0, title: str | None = None) -> Path:
    """PNG, one row per image: image | true tokens | predicted tokens (masked cells) | correct (green) / wrong (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lomar.data.transforms import denormalize
    from lomar.viz.reconstruction import save_figure

    maps = token_maps(model, images, seed)
    colours = _palette(model.config.vocab_size)
    true, predicted, masked = maps["true"].cpu(), maps["predicted"].cpu(), maps["masked"].cpu()
    dim = torch.where(masked[..., None], 1.0, 0.35)
    views = {
        "image": denormalize(images).permute(0, 2, 3, 1).cpu(),
        "true tokens": colours[true],
        "predicted (masked)": torch.where(masked[..., None], colours[predicted.clamp_min(0)], colours[true]) * dim,
        "correct / wrong": torch.where((predicted == true)[..., None], torch.tensor([0.1, 0.7, 0.2]),
                                       torch.tensor([0.85, 0.15, 0.1])) * masked[..., None]
                           + (~masked[..., None]) * torch.tensor([0.9, 0.9, 0.9]),
    }
    n = images.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(12, 3 * n + 0.6), squeeze=False)
    for row in range(n):
        for col, (name, view) in enumerate(views.items()):
            ax = axes[row, col]
            ax.imshow(view[row].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
    fig.suptitle(title or f"BEiT token prediction: accuracy {maps['accuracy']:.1%} on masked tokens, "
                          f"loss {maps['loss']:.3f}")
    return save_figure(fig, path, dpi=80)
