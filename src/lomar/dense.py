"""Documented import path of the dense-prediction backbones: the pyramid, the maps and the layout live in
``lomar.models.backbones``, the backbones read from a checkpoint or export in ``lomar.integrations.dense``."""

from lomar.integrations.dense import (
    MultiLevelBackbone,
    ViTDetBackbone,
    backbone_encoder,
    layer_decay_param_groups,
    load_encoder,
    with_rel_pos,
)
from lomar.models.backbones import LayerNorm2d, ShapeSpec, SimpleFeaturePyramid, backbone_layout, feature_maps

__all__ = ["LayerNorm2d", "ShapeSpec", "SimpleFeaturePyramid", "feature_maps", "backbone_layout", "ViTDetBackbone",
           "MultiLevelBackbone", "load_encoder", "backbone_encoder", "with_rel_pos", "layer_decay_param_groups"]
