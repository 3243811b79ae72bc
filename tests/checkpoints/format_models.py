"""The tiny ViT configuration the checkpoint-format tests write their checkpoints with."""

from lomar import ViTConfig

VIT = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
