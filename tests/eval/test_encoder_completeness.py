"""load_pretrained_encoder refuses weights that leave part of the encoder unset, whatever reader let them through."""

from __future__ import annotations

import pytest
import torch

from lomar.eval.features import load_pretrained_encoder
from lomar.models.vit import VisionTransformer, ViTConfig


@pytest.mark.parametrize("missing", ["norm.weight", "blocks.0.attn.qkv.weight"])
def test_an_original_checkpoint_missing_an_encoder_weight_is_an_error_naming_it(tmp_path, missing):
    torch.manual_seed(0)
    state = VisionTransformer(ViTConfig(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)).state_dict()
    del state[missing]
    torch.save({"model": state, "args": {"input_size": 16}}, tmp_path / "mae.pth")
    with pytest.raises(ValueError, match=rf"does not hold a complete encoder .*: missing \['{missing}'\]"):
        load_pretrained_encoder(tmp_path / "mae.pth", num_heads=2)
