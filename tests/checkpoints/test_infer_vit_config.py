"""infer_vit_config: the bound on the image size a checkpoint's saved settings give (an absolute table is built for
it), and the input channels read from the weights."""

from __future__ import annotations

import pytest
import torch

from lomar.checkpoints.keys import infer_vit_config
from lomar.limits import MAX_IMG_SIZE
from lomar.models.vit import VisionTransformer, ViTConfig


@pytest.mark.parametrize("img_size", [MAX_IMG_SIZE + 1, -16])
def test_a_saved_image_size_outside_the_bounds_is_named_with_the_fix(img_size):
    torch.manual_seed(0)
    state = VisionTransformer(ViTConfig(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)).state_dict()
    with pytest.raises(ValueError, match=rf"^image size {img_size} \(from the checkpoint's saved settings\) is outside "
                                         rf"\[1, {MAX_IMG_SIZE}\]; pass img_size=\.\.\. for the size to load it at$"):
        infer_vit_config(state, {"img_size": img_size}, num_heads=2)


def test_a_saved_image_size_at_the_bound_is_taken():
    state = VisionTransformer(ViTConfig(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)).state_dict()
    assert infer_vit_config(state, {"img_size": MAX_IMG_SIZE}, num_heads=2).img_size == MAX_IMG_SIZE


def test_the_input_channels_are_the_patch_embeddings():
    state = VisionTransformer(ViTConfig(img_size=16, patch_size=8, in_chans=1, embed_dim=16, depth=1,
                                        num_heads=2)).state_dict()
    assert infer_vit_config(state, {"img_size": 16}, num_heads=2).in_chans == 1


def test_a_position_table_without_a_cls_token_is_refused_as_a_vit_without_a_class_token(tmp_path):
    """timm's class_token=False: a 4x4 grid's table of 16 entries, read as cls + 15 patches, would be 'not a square
    grid'; the file is named with what it lacks, before its heads are asked for."""
    state = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=3,
                                        pos="abs")).state_dict()
    state = {k: v[:, 1:] if k == "pos_embed" else v for k, v in state.items() if k != "cls_token"}
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'vit.pth'} holds a position table but no cls_token: a ViT "
                                         rf"without a class token \(timm's class_token=False\)"):
        infer_vit_config(state, {}, tmp_path / "vit.pth")
