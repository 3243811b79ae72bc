"""Plain nn.Modules: the ViT and its position encodings, masking plans, the objectives, the pretraining models
(LoMaR, MAE, BEiT; :mod:`lomar.methods` puts them to work) and the dense ones on a ViT encoder: its backbones
(:mod:`.backbones`), Mask R-CNN (:mod:`.mask_rcnn`) and UperNet (:mod:`.segmenter`, its heads :mod:`.upernet`)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what a type checker or an IDE reads for the names below, which run time imports on first use
    from lomar.models.lomar import LoMaR as LoMaR
    from lomar.models.mae import MAE as MAE

# Public name -> the module that defines it. Imported on first use, so that the package's torch-free modules
# (vit_config, attention_sizes: what lomar bench --task backbone plans by before its children import torch) cost no
# torch import.
_EXPORTS = {"LoMaR": "lomar.models.lomar", "MAE": "lomar.models.mae"}

__all__ = ["LoMaR", "MAE"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'lomar.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
