"""Reconstruction targets and loss shared by LoMaR and MAE (SPEC §1.8–9)."""

from __future__ import annotations

import torch

__all__ = ["patchify", "unpatchify", "gather_patches", "normalize_targets", "masked_mse"]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, Hg·Wg, p·p·C), per patch ordered (row, col, channel)."""
    n, c, h, w = images.shape
    p = patch_size
    x = images.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int],
               channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: (N, Hg·Wg, p·p·C) -> (N, C, H, W)."""
    n = patches.shape[0]
    p, (hg, wg) = patch_size, grid
    x = patches.reshape(n, hg, wg, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, hg * p, wg * p)


def gather_patches(images: torch.Tensor, patch_size: int, image_index: torch.Tensor,
                   token_index: torch.Tensor) -> torch.Tensor:
    """Pixels of selected patches without copying the whole image.

    images (N, C, H, W); image_index (R,); token_index (R, T) raster grid indices
    -> (R, T, C, p, p), i.e. the layout the patch-embedding conv weight expects.
    """
    n, c, h, w = images.shape
    p, wg = patch_size, w // patch_size
    view = images.view(n, c, h // p, p, wg, p)
    rows, cols = token_index // wg, token_index % wg
    # Advanced indices separated by slices move to the front: result (R, T, C, p, p).
    return view[image_index[:, None], :, rows, :, cols, :]


def normalize_targets(target: torch.Tensor, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation over the last dim with the unbiased variance."""
    if not norm_pix:
        return target
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of the per-token mean squared error.

    pred, target (..., T, P); mask (..., T) bool or {0, 1} -> scalar.
    """
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum()
