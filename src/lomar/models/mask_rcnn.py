"""Mask R-CNN (torchvision) on a LoMaR/MAE encoder through ViTDet's simple feature pyramid.

The recipe of ViTDet (Li et al., 2022) where torchvision allows it: pyramid levels p2-p6
(strides 4-64) from the last block, one anchor size per level (32-512 px, three aspect ratios),
a two-conv RPN head, four-conv + one-fc box head and four-conv mask head with channel
LayerNorm, RoIAlign 7x7 (boxes) / 14x14 (masks) over p2-p5, and every image padded at its
bottom-right to one fixed ``size`` x ``size`` input (``size`` a multiple of 32). Training
images arrive already jittered to at most ``size`` (:func:`lomar.data.jitter.train_transforms`);
evaluation images are resized by the model so that their longest side is ``size``, and its
predictions are mapped back to the original image.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper

from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lomar.models.backbones import LayerNorm2d, ViTDetBackbone
from lomar.models.spec import BuiltOnEncoder
from lomar.models.vit import VisionTransformer

__all__ = ["PyramidBackbone", "FixedSizeTransform", "Fp32BoxCoder", "PyramidAnchors", "roi_pool", "ViTMaskRCNN",
           "unpasted_masks"]

ROI_LEVELS = ["p2", "p3", "p4", "p5"]
ROI_STRIDES = (4, 8, 16, 32)  # of ROI_LEVELS, in input pixels


class PyramidBackbone(nn.Module):
    """:class:`ViTDetBackbone` as torchvision's detectors want it: ``out_channels`` and an
    OrderedDict of maps. forward: (B, 3, H, W) -> {"p2": (B, C, H/4, W/4), ..., "p6": (B, C, H/64, W/64)}."""

    def __init__(self, encoder: VisionTransformer, out_channels: int = 256, grad_checkpointing: bool = False,
                 train_pos_embed: bool = True):
        super().__init__()
        if encoder.config.patch_size != 16:
            raise ValueError(f"the feature pyramid needs patch size 16 (strides 4-32), got "
                             f"{encoder.config.patch_size}; use a *_patch16 encoder")
        self.body = ViTDetBackbone(encoder, out_channels, top_block=True, grad_checkpointing=grad_checkpointing,
                                   train_pos_embed=train_pos_embed)
        self.out_channels = out_channels

    @property
    def encoder(self) -> VisionTransformer:
        return self.body.encoder

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(self.body(images))


class FixedSizeTransform(GeneralizedRCNNTransform):
    """Normalise, resize for evaluation (longest side ``size``, antialiased; training images come jittered and
    are not resized again), and pad each image at its bottom-right into a ``size`` x ``size`` batch.
    Padding is 0 after normalisation, the mean pixel, as ViTDet's. ``paste_masks`` False (:func:`unpasted_masks`):
    evaluation outputs keep the mask head's masks, their boxes mapped to the image's pixels as ever."""

    def __init__(self, size: int):
        super().__init__(size, size, list(IMAGENET_MEAN), list(IMAGENET_STD), size_divisible=32, _skip_resize=True)
        self.size = size
        self.paste_masks = True

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) in [0, 1] -> normalised; another channel count is refused in one line (torchvision's
        normalisation fails on 4 channels with a broadcasting error and spreads 1 over three unasked)."""
        if image.shape[0] != 3:
            raise ValueError(f"expected each image as (3, H, W) RGB in [0, 1], got {tuple(image.shape)}; drop an alpha "
                             f"channel (image[:3]) or repeat a grey one (image.expand(3, -1, -1))")
        return super().normalize(image)

    def postprocess(self, result: list[dict[str, torch.Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        if self.training or self.paste_masks:
            return super().postprocess(result, image_shapes, original_image_sizes)
        for prediction, size, original in zip(result, image_shapes, original_image_sizes):
            prediction["boxes"] = resize_boxes(prediction["boxes"], size, original)
        return result

    def resize(self, image: torch.Tensor, target: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        if self.training or target is not None:
            return super().resize(image, target)
        # torchvision's own resize is bilinear without antialiasing: an image larger than the input would be
        # point-sampled (aliased), unlike the antialiased jitter the detector trains on
        height, width = image.shape[-2:]
        scale = self.size / max(height, width)
        size = [max(1, min(self.size, round(height * scale))), max(1, min(self.size, round(width * scale)))]
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0], None

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        too_big = [tuple(i.shape[-2:]) for i in images if max(i.shape[-2:]) > self.size]
        if too_big:
            raise ValueError(f"an image of {too_big[0]} px does not fit the {self.size} px input; crop or resize it")
        batch = images[0].new_zeros(len(images), images[0].shape[0], self.size, self.size)
        for image, slot in zip(images, batch):
            slot[:, :image.shape[1], :image.shape[2]].copy_(image)
        return batch


class Fp32BoxCoder(BoxCoder):
    """torchvision's ``BoxCoder``, encoding and decoding in fp32 whatever the heads' dtype. Under bf16 autocast
    (what ``--precision auto`` picks on a GPU) the RPN's and box head's deltas come in bf16, and ``BoxCoder`` casts
    the anchors and proposals to them: 8 significant bits, so every RoI coordinate from 512 to 1024 px lands on a
    grid of 4 px (2 px from 256) and each regression target is taken from a centre rounded as much. detectron2's
    ``Box2BoxTransform``, which ViTDet trains with under autocast, decodes in fp32 for that reason."""

    def encode_single(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        return super().encode_single(reference_boxes.float(), proposals.float())

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return super().decode_single(rel_codes.float(), boxes.float())


class PyramidAnchors(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` at the pyramid's own strides (``strides``, one a level). torchvision takes a
    level's stride as the input size // its grid, which p6 (p5 subsampled by 2, its last cell kept) misstates where
    the input is an odd multiple of 32: at 800 px its 13 cells lie 64 px apart but the anchors 61 (the last
    one 36 px off), at 96 px 48. detectron2's anchor generator takes the strides from the backbone. The anchors are
    fp32 whatever the maps' dtype: torchvision's take it, bf16 under autocast, which puts them on a grid of 2 px from
    256 px and 4 px from 512 (detectron2's are fp32)."""

    def __init__(self, strides, sizes, aspect_ratios):
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(strides)

    def forward(self, image_list, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        grid_sizes = [feature_map.shape[-2:] for feature_map in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(stride, dtype=torch.int64, device=device)] * 2 for stride in self.strides]
        self.set_cell_anchors(torch.float32, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


def roi_pool(output_size: int) -> MultiScaleRoIAlign:
    """RoIAlign over ROI_LEVELS with the levels' scales fixed by their strides. torchvision infers them
    on its first call from that batch's largest unpadded image, and keeps them: here every image is
    padded to the fixed input size, so a first batch of small jittered images would fix wrong scales
    (1/2 for p2, say) for the whole run, and a resumed run could infer others."""
    pool = MultiScaleRoIAlign(ROI_LEVELS, output_size=output_size, sampling_ratio=0)
    pool.scales = [1 / stride for stride in ROI_STRIDES]
    levels = [stride.bit_length() - 1 for stride in ROI_STRIDES]  # log2: 2..5
    pool.map_levels = initLevelMapper(levels[0], levels[-1], canonical_scale=pool.canonical_scale,
                                      canonical_level=pool.canonical_level)
    return pool


class ViTMaskRCNN(BuiltOnEncoder, MaskRCNN):
    """torchvision's Mask R-CNN with ``num_classes`` foreground classes (labels 1..num_classes) on ``encoder``
    (an absolute position table trained unless ``train_pos_embed`` is False), ``size`` x ``size`` input;
    ``rois_per_image``: the RoIs training samples per image for the box and mask heads (ViTDet's 512).

    In training, ``model(images, targets)`` -> dict of losses; in eval, ``model(images)`` -> per
    image {"boxes" (N, 4) xyxy, "labels" (N,), "scores" (N,), "masks" (N, 1, H, W) in [0, 1]} in
    the coordinates of the image given (masks (N, 1, 28, 28) over the boxes under :func:`unpasted_masks`). Its
    model spec: the encoder's ViTConfig and :meth:`spec_args`.
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int, size: int, out_channels: int = 256,
                 grad_checkpointing: bool = False, detections_per_image: int = 100, train_pos_embed: bool = True,
                 rois_per_image: int = 512):
        if size % 32:
            raise ValueError(f"the input size must be a multiple of 32 (the coarsest pyramid stride), got {size}")
        backbone = PyramidBackbone(encoder, out_channels, grad_checkpointing, train_pos_embed)
        anchors = PyramidAnchors(backbone.body.pyramid.strides.values(), sizes=((32,), (64,), (128,), (256,), (512,)),
                                 aspect_ratios=((0.5, 1.0, 2.0),) * 5)
        rpn_head = RPNHead(out_channels, anchors.num_anchors_per_location()[0], conv_depth=2)
        box_head = FastRCNNConvFCHead((out_channels, 7, 7), [256] * 4, [1024], norm_layer=LayerNorm2d)
        mask_head = MaskRCNNHeads(out_channels, [256] * 4, 1, norm_layer=LayerNorm2d)
        super().__init__(
            backbone, num_classes=num_classes + 1,  # its image transform: FixedSizeTransform, set below
            rpn_anchor_generator=anchors, rpn_head=rpn_head,
            rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
            rpn_post_nms_top_n_train=1000, rpn_post_nms_top_n_test=1000,
            box_roi_pool=roi_pool(7), box_head=box_head, representation_size=1024, mask_roi_pool=roi_pool(14),
            mask_head=mask_head, box_detections_per_img=detections_per_image,
            box_batch_size_per_image=rois_per_image,
        )
        self.transform = FixedSizeTransform(size)
        for owner in (self.rpn, self.roi_heads):
            owner.box_coder = Fp32BoxCoder(owner.box_coder.weights, owner.box_coder.bbox_xform_clip)

    @property
    def encoder(self) -> VisionTransformer:
        return self.backbone.encoder

    def spec_args(self) -> dict:
        """The constructor's arguments beyond the encoder that shape the model, its predictions or its training losses,
        read off its parts (``grad_checkpointing`` and ``train_pos_embed`` change none)."""
        return {"num_classes": self.roi_heads.box_predictor.cls_score.out_features - 1, "size": self.transform.size,
                "out_channels": self.backbone.out_channels,
                "detections_per_image": self.roi_heads.detections_per_img,
                "rois_per_image": self.roi_heads.fg_bg_sampler.batch_size_per_image}


@contextlib.contextmanager
def unpasted_masks(model: ViTMaskRCNN) -> Iterator[ViTMaskRCNN]:
    """``model``, whose evaluation outputs keep each detection's mask as the mask head's (N, 1, 28, 28) probabilities
    over its box (the boxes in the image's pixels, as outside), to be pasted a few at a time
    (:func:`torchvision.models.detection.roi_heads.paste_masks_in_image` on a slice is the same arithmetic):
    torchvision pastes all of them at the image's size at once, and keeps a second copy, 2 x 100 x 12 M floats
    (9.6 GB) for one phone photo."""
    transform = model.transform
    pasting, transform.paste_masks = transform.paste_masks, False
    try:
        yield model
    finally:
        transform.paste_masks = pasting
