"""Tiny ViT settings and a pretraining checkpoint of them, shared by the downstream (k-NN, linear probe, finetune)
tests."""

from pathlib import Path

import torch

from lomar import MAE, LoMaR, ViTConfig
from lomar.checkpoints.io import atomic_save
from lomar.train.config import PretrainConfig

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY = dict(model="vit_tiny_patch8", embed_dim=32, depth=2, num_heads=2, img_size=32)


def _checkpoint(path: Path, method: str) -> Path:
    """A checkpoint in the format ``lomar pretrain`` writes: {"model": ..., "config": ...}."""
    torch.manual_seed(0)
    if method == "lomar":
        model = LoMaR(ViTConfig(pos="rpe", **VIT), window_size=3, num_windows=2)
        config = PretrainConfig(method="lomar", pos="rpe", window_size=3, windows=2, mask_ratio=0.8, **TINY)
    else:
        model = MAE(ViTConfig(pos="abs", **VIT), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
        config = PretrainConfig(method="mae", pos="abs", mask_ratio=0.75, decoder_embed_dim=16, decoder_depth=1,
                                decoder_num_heads=2, **TINY)
    with torch.no_grad():  # RPE tables start at zero: make them matter for the comparisons
        for name, p in model.named_parameters():
            if name.endswith("rpe.table"):
                p.normal_(0, 0.5)
    atomic_save({"model": model.state_dict(), "config": config.to_dict(), "step": 1}, path)
    return path
