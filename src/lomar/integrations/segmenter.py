"""The parameter groups ``lomar segment`` trains :class:`~lomar.models.segmenter.UperNetSegmenter` with: the
layer-wise lr decay of mmseg's ``LayerDecayOptimizerConstructor``."""

from __future__ import annotations

from lomar.integrations.dense import layer_decay_param_groups
from lomar.models.segmenter import UperNetSegmenter

__all__ = ["layer_decay_groups"]


def layer_decay_groups(model: UperNetSegmenter, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups as mmseg's ``LayerDecayOptimizerConstructor`` builds them
    (:func:`lomar.integrations.dense.layer_decay_param_groups`: the neck, heads and final norm at the full lr).
    Biases, norms, ``cls_token`` and ``pos_embed`` get no weight decay. Each group carries
    ``lr_scale`` (timm's key) and ``lr`` already scaled."""
    no_decay = {id(p) for name, p in model.named_parameters() if p.ndim == 1 or name.endswith(".bias")}
    no_decay |= {id(p) for name, p in model.encoder.named_parameters() if name in model.encoder.no_weight_decay()}
    groups = layer_decay_param_groups(model, model.encoder, weight_decay, layer_decay, no_decay)
    return [dict(group, lr=lr * group["lr_scale"]) for group in groups]
