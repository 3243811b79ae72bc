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

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead

from lomar.integrations.dense import layer_decay_param_groups
from lomar.models.backbones import LayerNorm2d, ViTDetBackbone
from lomar.models.mask_rcnn import FixedSizeTransform, Fp32BoxCoder, PyramidAnchors, roi_pool
from lomar.models.vit import VisionTransformer

__all__ = ["PyramidBackbone", "build_mask_rcnn", "detector_param_groups"]


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


def build_mask_rcnn(encoder: VisionTransformer, num_classes: int, size: int, out_channels: int = 256,
                    grad_checkpointing: bool = False, detections_per_image: int = 100,
                    train_pos_embed: bool = True) -> MaskRCNN:
    """Mask R-CNN with ``num_classes`` foreground classes (labels 1..num_classes) on ``encoder``
    (an absolute position table trained unless ``train_pos_embed`` is False).

    In training, ``model(images, targets)`` -> dict of losses; in eval, ``model(images)`` -> per
    image {"boxes" (N, 4) xyxy, "labels" (N,), "scores" (N,), "masks" (N, 1, H, W) in [0, 1]} in
    the coordinates of the image given.
    """
    if size % 32:
        raise ValueError(f"the input size must be a multiple of 32 (the coarsest pyramid stride), got {size}")
    backbone = PyramidBackbone(encoder, out_channels, grad_checkpointing, train_pos_embed)
    anchors = PyramidAnchors(backbone.body.pyramid.strides.values(), sizes=((32,), (64,), (128,), (256,), (512,)),
                             aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    rpn_head = RPNHead(out_channels, anchors.num_anchors_per_location()[0], conv_depth=2)
    box_head = FastRCNNConvFCHead((out_channels, 7, 7), [256] * 4, [1024], norm_layer=LayerNorm2d)
    mask_head = MaskRCNNHeads(out_channels, [256] * 4, 1, norm_layer=LayerNorm2d)
    model = MaskRCNN(
        backbone, num_classes=num_classes + 1,  # its image transform: FixedSizeTransform, set below
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_train=1000, rpn_post_nms_top_n_test=1000,
        box_roi_pool=roi_pool(7), box_head=box_head, representation_size=1024, mask_roi_pool=roi_pool(14),
        mask_head=mask_head, box_detections_per_img=detections_per_image,
    )
    model.transform = FixedSizeTransform(size)
    for owner in (model.rpn, model.roi_heads):
        owner.box_coder = Fp32BoxCoder(owner.box_coder.weights, owner.box_coder.bbox_xform_clip)
    return model


def detector_param_groups(model: MaskRCNN, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups as detectron2's ViTDet builds them: encoder parameters of layer l (0 the stem,
    i + 1 block i) at ``lr_scale`` = layer_decay^(depth + 1 - l), the pyramid and heads at 1
    (:func:`~lomar.integrations.dense.layer_decay_param_groups`); no weight decay on normalisation
    layers (ViTDet's decays its pyramid's and heads' channel LayerNorms: docs/dense.md) and the encoder's cls token /
    position table."""
    encoder = model.backbone.encoder
    no_decay = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d))
                for p in m.parameters(recurse=False)}
    no_decay |= {id(p) for name, p in encoder.named_parameters() if name in encoder.no_weight_decay()}
    return layer_decay_param_groups(model, encoder, weight_decay, layer_decay, no_decay)
