"""lomar: efficient self-supervised ViT pretraining by local masked reconstruction."""

from __future__ import annotations

import importlib

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
    "LoMaR": "lomar.models",
    "MAE": "lomar.models",
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
