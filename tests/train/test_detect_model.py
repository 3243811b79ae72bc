"""The ViTDet Mask R-CNN `lomar detect` trains: its fixed-size padding and parameter groups, RoI scales and anchors
at the pyramid's strides, fp32 box coordinates under bf16 autocast, and the evaluation's antialiased resize."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from lomar.integrations.detection import detector_param_groups
from lomar.models.mask_rcnn import FixedSizeTransform, ViTMaskRCNN
from lomar.models.vit import VisionTransformer, model_config


def test_detector_pads_to_a_fixed_size_and_groups_every_parameter_once():
    encoder = VisionTransformer(model_config("vit_tiny_patch16", img_size=64, depth=4, window_size=2,
                                             global_blocks=(1, 3)))
    with pytest.raises(ValueError, match="multiple of 32"):
        ViTMaskRCNN(encoder, 2, 80)
    model = ViTMaskRCNN(encoder, 2, 64)
    features = model.backbone(torch.zeros(1, 3, 64, 64))
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "p2": (16, 16), "p3": (8, 8), "p4": (4, 4), "p5": (2, 2), "p6": (1, 1)}
    batch = FixedSizeTransform(64).batch_images([torch.ones(3, 40, 64), torch.ones(3, 64, 20)])
    assert batch.shape == (2, 3, 64, 64)
    assert batch[0, :, :40].eq(1).all() and batch[0, :, 40:].eq(0).all() and batch[1, :, :, 20:].eq(0).all()
    groups = detector_param_groups(model, 0.1, 0.7)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    # detectron2's get_vit_lr_decay_rate: 0.7^(depth + 1 - layer), stem layer 0, block i layer i + 1
    assert scale_of[id(encoder.patch_embed.proj.weight)] == pytest.approx(0.7 ** 5)
    assert scale_of[id(encoder.blocks[0].attn.qkv.weight)] == pytest.approx(0.7 ** 4)
    assert scale_of[id(encoder.blocks[3].attn.qkv.bias)] == pytest.approx(0.7)
    assert scale_of[id(model.roi_heads.box_predictor.cls_score.weight)] == 1.0
    assert decay_of[id(encoder.blocks[0].norm1.weight)] == decay_of[id(encoder.cls_token)] == 0.0
    assert decay_of[id(encoder.blocks[0].attn.qkv.weight)] == decay_of[id(encoder.blocks[0].attn.qkv.bias)] == 0.1


def test_roi_scales_follow_the_pyramid_not_the_first_batchs_image_sizes():
    # torchvision infers them from the first batch's largest unpadded image: a 20x26 one, padded to 64,
    # would fix p2 at 1/2 instead of 1/4 for the rest of the run
    torch.manual_seed(0)
    model = ViTMaskRCNN(VisionTransformer(model_config("vit_tiny_patch16", img_size=64, depth=2)), 2, 64)
    target = {"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0]]), "labels": torch.tensor([1]),
              "masks": torch.ones(1, 20, 26, dtype=torch.uint8)}
    model.train()([torch.rand(3, 20, 26)], [target])
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        assert (pool.map_levels.k_min, pool.map_levels.k_max) == (2, 5)


@pytest.mark.parametrize("size, p6_grid", [(96, 2), (800, 13)])
def test_anchors_lie_at_the_pyramids_strides(size, p6_grid):
    # torchvision took a level's stride as input // grid: p6's (p5 subsampled by 2) at an odd multiple of 32 was
    # 48 at 96 px, 61 at 800, while its cells lie 64 px apart
    model = ViTMaskRCNN(VisionTransformer(model_config("vit_tiny_patch16", img_size=32, depth=1)), 2, size)
    grids = [(size // stride,) * 2 for stride in (4, 8, 16, 32)] + [(p6_grid,) * 2]
    features = [torch.zeros(1, 1, *grid) for grid in grids]
    images = ImageList(torch.zeros(1, 3, size, size), [(size, size)])
    (anchors,) = model.rpn.anchor_generator(images, features)
    levels = anchors.split([3 * h * w for h, w in grids])
    for (h, w), stride, level in zip(grids, (4, 8, 16, 32, 64), levels):
        centres = ((level[:, :2] + level[:, 2:]) / 2).unique(dim=0)
        assert [sorted(set(centres[:, k].tolist())) for k in (1, 0)] == [[stride * i for i in range(n)]
                                                                         for n in (h, w)], stride


def test_rois_keep_fp32_coordinates_under_bf16_autocast():
    # torchvision's BoxCoder cast anchors and proposals to the bf16 deltas (a GPU's default precision): the ground
    # truth box joined the RoIs with x1 100.5 for 100.3, and above 512 px every RoI lay on a 4 px grid
    torch.manual_seed(0)
    model = ViTMaskRCNN(VisionTransformer(model_config("vit_tiny_patch16", img_size=128, depth=1)), 2, 128)
    gt = torch.tensor([[100.3, 60.7, 120.1, 90.2]])
    masks = torch.zeros(1, 128, 128, dtype=torch.uint8)
    masks[0, 61:90, 100:120] = 1
    rois, add = [], model.roi_heads.add_gt_proposals

    def sampled(proposals, boxes):  # the RoIs the heads would train on; the heads themselves are not needed
        rois.extend(add(proposals, boxes))
        raise StopIteration

    model.roi_heads.add_gt_proposals = sampled
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(StopIteration):
        model.train()([torch.rand(3, 128, 128)], [{"boxes": gt, "labels": torch.tensor([1]), "masks": masks}])
    assert rois[0].dtype == torch.float32 and torch.equal(rois[0][-1:], gt)


def test_anchors_keep_fp32_coordinates_under_bf16_autocast():
    # the anchors took the pyramid's dtype, bf16 under autocast (a GPU's default precision): from 256 px on they lay on
    # a grid of 2 px (4 px from 512), so each RPN target and proposal was measured from a shifted box
    class Anchored(Exception):
        """Raised once the anchors are made: the proposals and heads after them (seconds at 512 px, bf16 on the CPU)
        are not what this test checks."""

    def made(module, args, out):
        anchors.append((args[1][0].dtype, out[0]))
        raise Anchored

    torch.manual_seed(0)
    # a 32-channel pyramid: the maps' dtype, not their width, is what the anchors must not follow; 256 channels at
    # 512 px, bf16 emulated on a CPU without bf16 units, would be most of the test's time
    model = ViTMaskRCNN(VisionTransformer(model_config("vit_tiny_patch16", img_size=64, depth=1)), 2, 512,
                        out_channels=32).eval()
    anchors = []
    model.rpn.anchor_generator.register_forward_hook(made)
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad(), pytest.raises(Anchored):
        model(image)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(Anchored):
        model(image)
    (fp32_maps, exact), (bf16_maps, autocast) = anchors
    assert (fp32_maps, bf16_maps) == (torch.float32, torch.bfloat16)  # the pyramid's maps are bf16 under autocast
    assert autocast.dtype == torch.float32 and torch.equal(autocast, exact)


def test_evaluation_shrinks_a_large_image_with_antialiasing_as_training_does():
    # torchvision's evaluation resize is bilinear without antialiasing: a 1-pixel checkerboard shrunk to the
    # 64 px input was point-sampled into patterns (std 0.73 after normalisation) instead of its mean grey
    transform = FixedSizeTransform(64).eval()
    yy, xx = torch.meshgrid(torch.arange(300), torch.arange(200), indexing="ij")
    board = ((yy + xx) % 2).float().expand(3, -1, -1)
    batch, _ = transform([board])
    assert batch.image_sizes == [(64, 43)]
    assert float(batch.tensors[0, :, :64, :43].flatten(1).std(1).max()) < 0.05
    detections = [{"boxes": torch.tensor([[0.0, 0.0, 43.0, 64.0]]), "labels": torch.tensor([1]),
                   "scores": torch.tensor([1.0]), "masks": torch.ones(1, 1, 28, 28)}]
    back = transform.postprocess(detections, batch.image_sizes, [(300, 200)])[0]  # the image's own pixels again
    assert back["boxes"].tolist() == [[0.0, 0.0, 200.0, 300.0]] and back["masks"].shape == (1, 1, 300, 200)
