"""What the dense models refuse from a Python caller, in one line naming the value and the fix: a multi-level
backbone's block indices beyond the encoder's depth (its default is ViT-B's (3, 5, 7, 11), out of range for a
shallower encoder)."""

from __future__ import annotations

import pytest
import torch

from lomar.models.backbones import MultiLevelBackbone
from lomar.models.vit import VisionTransformer, ViTConfig

TINY = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2)


def test_a_multilevel_backbone_out_of_range_names_the_blocks_to_pass():
    with pytest.raises(ValueError, match=r"^out_indices \(3, 5, 7, 11\) out of range for a 4-block encoder; pass "
                                         r"blocks in 0..3, e.g. out_indices=\(0, 1, 2, 3\) "):
        MultiLevelBackbone(VisionTransformer(TINY))
    suggested = (0, 1, 2, 3)
    maps = MultiLevelBackbone(VisionTransformer(TINY), out_indices=suggested)(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 4, 4)] * 4
