"""MAE inside local windows (the paper's §4.6 ablation): an encoder–decoder per K×K window.

For every (image, window) of a masking plan the encoder sees only the window's visible tokens and
the MAE decoder reconstructs the window's masked tokens. Positions are relative to the window:
fixed 2-D sin-cos tables of the K×K grid for encoder and decoder (not the image's tables).
Parameters are exactly MAE's, so checkpoints and exports are MAE's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lomar.models.abs_pos import sincos_pos_embed_2d
from lomar.models.mae import MAE
from lomar.models.masking import MaskingPlan, check_window_request, num_masked, sample_plan, window_token_index
from lomar.models.objective import gather_patches, masked_mse, normalize_targets
from lomar.models.vit import ViTConfig

__all__ = ["MAEWindow", "MAEWindowOutput"]


class MAEWindowOutput(NamedTuple):
    loss: torch.Tensor  # () mean squared error over masked tokens
    pred: torch.Tensor  # (N·n, K·K, p·p·C) decoder output per window token
    plan: MaskingPlan


class MAEWindow(MAE):
    """MAE's encoder and decoder applied per window; random in-window masking (same count per window)."""

    def __init__(self, config: ViTConfig, window_size: int = 7, num_windows: int = 4, mask_ratio: float = 0.75,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 norm_pix_loss: bool = True):
        super().__init__(config, decoder_embed_dim, decoder_depth, decoder_num_heads, mask_ratio, norm_pix_loss)
        check_window_request(self.encoder.grid, window_size, num_windows, mask_ratio)
        self.window_size, self.num_windows = int(window_size), int(num_windows)  # Python ints, as MAE's settings
        k = (window_size, window_size)
        # Not persistent: fixed tables, so the state dict stays MAE's.
        self.register_buffer("window_pos", sincos_pos_embed_2d(config.embed_dim, k), persistent=False)
        self.register_buffer("decoder_window_pos", sincos_pos_embed_2d(decoder_embed_dim, k), persistent=False)

    def spec_args(self) -> dict:
        return dict(window_size=self.window_size, num_windows=self.num_windows, **super().spec_args())

    def sample_plan(self, images: torch.Tensor, generator: torch.Generator | None = None) -> MaskingPlan:
        return sample_plan(images.shape[0], self.encoder.image_grid(images), self.window_size, self.num_windows,
                           self.mask_ratio, generator=generator, device=images.device)

    def _masked_per_window(self, plan: MaskingPlan) -> int:
        """The one count of masked tokens of every window of the plan.

        Compiled, it is the model's floor(K²·ratio) (a static shape), checked on the device. Eagerly,
        the plan's own count (:meth:`MaskingPlan.masked_counts`: counted on the host when the training
        loop checked the plan).
        """
        if torch.compiler.is_compiling():
            masked = num_masked(self.window_size, self.mask_ratio)
            torch._assert_async((plan.mask.sum(-1) == masked).all(), "MAE with windows, compiled, needs exactly "
                                "floor(K*K*mask_ratio) masked tokens in every window; run other plans uncompiled")
            return masked
        fewest, most = plan.masked_counts()
        if fewest != most:
            raise ValueError(f"MAE with windows needs the same number of masked tokens in every window "
                             f"(random in-window masking); the plan's windows mask {fewest} to {most}")
        return fewest

    def forward(self, images: torch.Tensor, plan: MaskingPlan | None = None,
                generator: torch.Generator | None = None) -> MAEWindowOutput:
        """images (N, C, H, W) normalised → loss, pred (N·n, K·K, p·p·C), plan."""
        enc, p, k = self.encoder, self.config.patch_size, self.window_size
        grid = enc.image_grid(images)
        plan = self.sample_plan(images, generator) if plan is None else MaskingPlan.for_batch(plan, images, k, grid)
        image_index, top_left, mask = plan.flat()
        keep = k * k - self._masked_per_window(plan)
        token_index = window_token_index(top_left, k, grid[1])
        pixels = gather_patches(images, p, image_index, token_index)  # (R, K², C, p, p)
        rows = pixels.shape[0]
        x = enc.patch_embed.embed_patches(pixels.flatten(2)) + self.window_pos[1:].to(pixels.dtype)
        # Visible tokens first, in raster order (stable sort of the 0/1 mask).
        ids_shuffle = mask.to(torch.uint8).argsort(dim=1, stable=True)
        x = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, x.shape[-1]))
        cls = (enc.cls_token + self.window_pos[:1]).to(x.dtype).expand(rows, -1, -1)
        x = enc.norm(enc.forward_blocks(torch.cat([cls, x], dim=1), (k, k)))
        pred = self._decode(x, ids_shuffle, self.decoder_window_pos)
        target = normalize_targets(pixels.permute(0, 1, 3, 4, 2).flatten(2).float(), self.norm_pix_loss)
        return MAEWindowOutput(masked_mse(pred, target, mask), pred, plan.as_output())
