"""lomar: efficient self-supervised ViT pretraining by local masked reconstruction."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what a type checker or an IDE reads for the names below, which run time imports on first use
    from lomar.checkpoints.export import create_encoder as create_encoder
    from lomar.checkpoints.export import export_encoder as export_encoder
    from lomar.checkpoints.formats import load_model as load_model
    from lomar.checkpoints.io import atomic_save as atomic_save
    from lomar.checkpoints.io import safe_load as safe_load
    from lomar.checkpoints.keys import lomar_from_original as lomar_from_original
    from lomar.checkpoints.keys import lomar_to_original as lomar_to_original
    from lomar.checkpoints.original import load_original as load_original
    from lomar.models.lomar import LoMaR as LoMaR
    from lomar.models.mae import MAE as MAE
    from lomar.models.masking import MaskingPlan as MaskingPlan
    from lomar.models.masking import sample_plan as sample_plan
    from lomar.models.vit import VisionTransformer as VisionTransformer
    from lomar.models.vit import ViTConfig as ViTConfig
    from lomar.models.vit import list_models as list_models
    from lomar.models.vit import model_config as model_config

__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use, so that `import lomar`
# (and with it `lomar --help`) costs no torch import.
_EXPORTS = {
    "atomic_save": "lomar.checkpoints.io",
    "load_original": "lomar.checkpoints.original",
    "lomar_from_original": "lomar.checkpoints.keys",
    "lomar_to_original": "lomar.checkpoints.keys",
    "safe_load": "lomar.checkpoints.io",
    "create_encoder": "lomar.checkpoints.export",
    "export_encoder": "lomar.checkpoints.export",
    "load_model": "lomar.checkpoints.formats",
    "MaskingPlan": "lomar.models.masking",
    "sample_plan": "lomar.models.masking",
    "LoMaR": "lomar.models.lomar",
    "MAE": "lomar.models.mae",
    "ViTConfig": "lomar.models.vit",
    "VisionTransformer": "lomar.models.vit",
    "list_models": "lomar.models.vit",
    "model_config": "lomar.models.vit",
}

__all__ = ["__version__", *sorted(_EXPORTS, key=str.lower)]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'lomar' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
