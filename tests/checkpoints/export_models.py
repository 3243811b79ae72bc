"""Tiny encoder configurations, an input batch and weight helpers shared by the export tests."""

import torch

from lomar import ViTConfig

TINY = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2)
# ViTDet layout: block 0 attends inside 4x4 tiles of X's 8x12 grid, block 1 globally
WINDOWED = ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4, global_blocks=(1,))
X = torch.randn(2, 3, 64, 96)  # not the pretraining size: RPE needs no interpolation


def _perturb(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial RPE tables and cls token, so that every part of the encoder matters."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("rpe.table", "cls_token", "mask_token")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return module.eval()
