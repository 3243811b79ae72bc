"""UperNet on a ViT encoder as mmsegmentation's MAE / BEiT ADE20K recipes build it (:mod:`lomar.models.upernet`
holds its heads): which blocks feed its pyramid, and its losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["spread_indices", "segmentation_losses"]


def spread_indices(depth: int) -> tuple[int, ...]:
    """The blocks whose maps feed the pyramid: (3, 5, 7, 11) for depth 12, (7, 11, 15, 23) for 24
    (mmseg's choices), the same fractions (1/3, 1/2, 2/3, 1 of the depth) for any other."""
    return tuple(max(0, round(depth * k / 12) - 1) for k in (4, 6, 8, 12))


def segmentation_losses(logits: torch.Tensor, extra: torch.Tensor | None, labels: torch.Tensor, aux_weight: float,
                        ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """The terms of :meth:`UperNetSegmenter.loss` from the outputs of ``forward(images, aux=True)``: logits
    and ``extra`` (B, N, H, W), labels (B, H, W); apart, so that a DDP wrapper's forward computes them.
    ``loss_decode``, and with the auxiliary head ``loss_aux`` (its cross-entropy x ``aux_weight``)."""
    losses = {"loss_decode": _pixel_mean_loss(logits, labels, ignore_index)}
    if extra is not None:
        losses["loss_aux"] = aux_weight * _pixel_mean_loss(extra, labels, ignore_index)
    return losses


def _pixel_mean_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # mmseg's default (avg_non_ignore=False): the mean over every pixel, an ignored one counting 0, so that a
    # batch without a labelled pixel gives 0 where a mean over the labelled ones would give NaN
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum") / labels.numel()
