"""LoMaR: masked reconstruction inside small windows of patches (SPEC §1).

Only the window tokens are ever cut out and embedded: each (image, window) pair becomes
one short sequence [cls] + K·K tokens, so the encoder's cost depends on the number of
windows, not on the image size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from lomar.models.masking import MaskingPlan, check_window_request, sample_plan, tile_grid, window_token_index
from lomar.models.objective import gather_patches, masked_mse, normalize_targets
from lomar.models.vit import VisionTransformer, ViTConfig

__all__ = ["LoMaR", "LoMaROutput"]


class LoMaROutput(NamedTuple):
    """What :meth:`LoMaR.forward` gives (a tuple: ``loss, pred, plan = model(images)``).

    loss: () mean squared error over the masked tokens. pred: (N·n, K·K, p·p·C) the head's output for every token of
    each window, image-major, row r the window ``plan.flat()`` lists r-th; pixels in (row, col, channel) order
    (:func:`~lomar.models.objective.patchify`), normalised by the patch's own mean and std where the model
    has ``norm_pix_loss``. plan: the windows and masks used.
    """

    loss: torch.Tensor  # () mean squared error over masked tokens
    pred: torch.Tensor  # (N·n, K·K, p·p·C) head output per window token, image-major
    plan: MaskingPlan


class LoMaR(nn.Module):
    """Encoder + mask token + linear pixel head, trained on masked windows.

    Args:
        config: encoder architecture (``pos='rpe'`` is the method; ``'abs'`` adds each
            token's sin-cos position in the full image, an ablation).
        window_size: K, windows are K×K patches.
        num_windows: windows sampled per image when no plan is given.
        mask_ratio: share of each window's tokens that is masked (floor(K·K·ratio)).
        norm_pix_loss: regress per-patch normalised pixels.
    """

    def __init__(self, config: ViTConfig, window_size: int = 7, num_windows: int = 4,
                 mask_ratio: float = 0.8, norm_pix_loss: bool = True):
        super().__init__()
        self.encoder = VisionTransformer(config)
        self.encoder.freeze_pos_embed()
        check_window_request(self.encoder.grid, window_size, num_windows, mask_ratio)
        if not isinstance(norm_pix_loss, bool):  # a str such as "no" would be true
            raise TypeError(f"norm_pix_loss must be True or False, got {norm_pix_loss!r}")
        # Python numbers (numpy's, say, would make a checkpoint that a weights-only load refuses)
        self.window_size, self.num_windows, self.mask_ratio = int(window_size), int(num_windows), float(mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        dim, p = config.embed_dim, config.patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.head = nn.Linear(dim, p * p * config.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> ViTConfig:
        return self.encoder.config

    def spec_args(self) -> dict:
        """Constructor arguments beyond the config (:mod:`lomar.models.spec`)."""
        return dict(window_size=self.window_size, num_windows=self.num_windows, mask_ratio=self.mask_ratio,
                    norm_pix_loss=self.norm_pix_loss)

    def sample_plan(self, images: torch.Tensor, generator: torch.Generator | None = None) -> MaskingPlan:
        """The plan ``forward`` draws for images (N, C, H, W) when given none: ``num_windows`` windows per image
        (top_left (N, n, 2), mask (N, n, K·K)), placement ``"distinct"`` (:func:`~lomar.models.masking.sample_plan`)."""
        grid = self.encoder.image_grid(images)
        return sample_plan(images.shape[0], grid, self.window_size, self.num_windows,
                           self.mask_ratio, generator=generator, device=images.device)

    def forward(self, images: torch.Tensor, plan: MaskingPlan | None = None,
                generator: torch.Generator | None = None) -> LoMaROutput:
        """images (N, C, H, W) normalised with ImageNet's mean and std, any size a multiple of the patch -> loss (),
        pred (N·n, K·K, p·p·C), plan (:class:`LoMaROutput`). ``plan`` fixes the windows and masks; without it they are
        drawn from ``generator`` (:meth:`sample_plan`)."""
        grid = self.encoder.image_grid(images)
        if images.shape[0] == 0:  # as MAE's: the loss over no masked token is 0 / 0
            raise ValueError("LoMaR needs at least one image; got an empty batch")
        plan = (self.sample_plan(images, generator) if plan is None
                else MaskingPlan.for_batch(plan, images, self.window_size, grid))
        return LoMaROutput(*self.forward_windows(images, *plan.flat()), plan.as_output())

    def forward_windows(self, images: torch.Tensor, image_index: torch.Tensor,
                        top_left: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence per row: image index (R,), window top-left (R, 2), mask (R, K·K) bool.

        Returns (loss, pred (R, K·K, p·p·C)).
        """
        encoder, k, p = self.encoder, self.window_size, self.config.patch_size
        grid = tile_grid(*images.shape[-2:], p)
        token_index = window_token_index(top_left, k, grid[1])  # (R, K·K)
        pixels = gather_patches(images, p, image_index, token_index)  # (R, K·K, C, p, p)
        x = encoder.prepare_tokens(pixels.flatten(2), grid, token_index, mask, self.mask_token)
        x = encoder.norm(encoder.forward_blocks(x, (k, k)))
        pred = self.head(x[:, 1:])
        target = normalize_targets(pixels.permute(0, 1, 3, 4, 2).flatten(2).float(), self.norm_pix_loss)
        return masked_mse(pred, target, mask), pred
