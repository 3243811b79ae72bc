"""The parameter groups ``lomar detect`` trains the Mask R-CNN of :mod:`lomar.models.mask_rcnn` with: ViTDet's
layer-wise lr decay."""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import MaskRCNN

from lomar.integrations.dense import layer_decay_param_groups

__all__ = ["detector_param_groups"]


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
