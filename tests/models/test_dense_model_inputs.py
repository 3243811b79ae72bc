"""What the dense models refuse from a Python caller, in one line naming the value and the fix: a detector's image
that is not (3, H, W) RGB (an RGBA or grey tensor as torchvision.io reads a PNG), a segmenter's RGBA or grey batch,
a multi-level backbone's block indices beyond the encoder's depth (its default is ViT-B's (3, 5, 7, 11), out of range
for a shallower encoder), an image with a side below the least a pyramid takes (compiled with dynamic shapes too);
and a ViTDet backbone taken by torchvision's detectors as it is."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from lomar.models.backbones import MultiLevelBackbone, ViTDetBackbone
from lomar.models.mask_rcnn import ViTMaskRCNN
from lomar.models.segmenter import UperNetSegmenter
from lomar.models.vit import VisionTransformer, ViTConfig

TINY = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2)


@pytest.mark.parametrize("channels", [4, 2, 1])
def test_a_detector_refuses_an_image_of_other_than_three_channels(channels):
    model = ViTMaskRCNN(VisionTransformer(TINY), 3, 64).eval()
    with pytest.raises(ValueError, match=rf"expected each image as \(3, H, W\) RGB in \[0, 1\], got \({channels}, "
                                         rf"48, 40\); drop an alpha channel \(image\[:3\]\) or repeat a grey one"):
        with torch.no_grad():
            model([torch.rand(3, 64, 64), torch.rand(channels, 48, 40)])


def test_a_multilevel_backbone_out_of_range_names_the_blocks_to_pass():
    said = (r"^out_indices \({}\) out of range for a 4-block encoder; pass blocks in -4..3 \(negative from the last "
            r"block, as timm takes them\), e.g. out_indices=\(0, 1, 2, 3\) ")
    with pytest.raises(ValueError, match=said.format("3, 5, 7, 11")):
        MultiLevelBackbone(VisionTransformer(TINY))
    with pytest.raises(ValueError, match=said.format("-5, -1")):
        MultiLevelBackbone(VisionTransformer(TINY), out_indices=(-5, -1))
    encoder = VisionTransformer(TINY)
    maps = MultiLevelBackbone(encoder, out_indices=(0, 1, 2, 3))(images := torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 4, 4)] * 4
    # the range said holds: -4 is block 0, as in timm's forward_intermediates
    assert torch.equal(MultiLevelBackbone(encoder, out_indices=(-4, -1))(images)[0], maps[0])


def test_a_vitdet_backbone_builds_torchvisions_faster_rcnn():
    """docs/dense.md, "Other toolkits": torchvision's detectors take the backbone as it is (they read its
    ``out_channels``); its levels are the RoI pooler's feature names."""
    backbone = ViTDetBackbone(VisionTransformer(TINY), out_channels=16)
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 4)
    model = FasterRCNN(backbone, num_classes=3, rpn_anchor_generator=anchors, min_size=64, max_size=64,
                       box_roi_pool=MultiScaleRoIAlign(backbone._out_features, 7, 2), representation_size=32).eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 48)])
    assert out["boxes"].shape[-1] == 4 and len(out["boxes"]) == len(out["labels"]) == len(out["scores"])


@pytest.mark.parametrize("build", [
    lambda: UperNetSegmenter(VisionTransformer(TINY), 3, channels=16, aux_channels=8),
    lambda: ViTDetBackbone(VisionTransformer(TINY), out_channels=16),
], ids=["segmenter", "vitdet"])
def test_an_image_below_the_pyramids_least_side_is_refused_naming_it(build):
    """A pyramid's stride-32 level halves the grid of 16-pixel patches: a side of one patch is refused in one line
    naming the size and the least side, and the least side itself runs."""
    model = build().eval()
    with torch.no_grad():
        for size in [(16, 16), (64, 16)]:
            with pytest.raises(ValueError, match=rf"^image size {size[0]}x{size[1]} is below the least this pyramid "
                                                 rf"takes, 32 a side .*; pad each side to a multiple of 32"):
                model(torch.rand(1, 3, *size))
        model(torch.rand(1, 3, 32, 32))


def test_a_segmenter_compiled_with_dynamic_shapes_refuses_a_short_side_in_one_line():
    """Traced with symbolic sides, the least-side check still raises its own one-line error, for each size (not a
    dynamo error, nor max pool's deep in the pyramid). A compiled call that runs first (64x32, then 32x96) traces
    the whole model: ~20 s a call on a 2-core CPU, left out here."""
    model = UperNetSegmenter(VisionTransformer(TINY), 3, channels=16, aux_channels=8).eval()
    compiled = torch.compile(model, backend="eager", dynamic=True)
    with torch.no_grad():
        for size in [(64, 16), (16, 48)]:
            with pytest.raises(ValueError, match=rf"^image size {size[0]}x{size[1]} is below the least this pyramid "
                                                 r"takes, 32 a side \(its stride-32 level halves the map of 16-pixel "
                                                 r"patches\); pad each side to a multiple of 32$"):
                compiled(torch.rand(1, 3, *size))


@pytest.mark.parametrize("channels", [4, 1])
def test_a_segmenter_given_an_rgba_or_grey_batch_names_the_fix(channels):
    model = UperNetSegmenter(VisionTransformer(TINY), 3, channels=16, aux_channels=8).eval()
    with pytest.raises(ValueError, match=rf"^expected images of shape \(N, 3, H, W\), got \(1, {channels}, 64, 64\); "
                                         r"drop an alpha channel \(images\[:, :3\]\) or repeat a grey one "
                                         r"\(images.expand\(-1, 3, -1, -1\)\)$"):
        with torch.no_grad():
            model(torch.rand(1, channels, 64, 64))
