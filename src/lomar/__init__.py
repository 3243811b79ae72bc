"""lomar: efficient self-supervised ViT pretraining by local masked reconstruction."""

__version__ = "0.1.0"

from lomar.checkpoints.export import create_encoder, export_encoder
from lomar.checkpoints.formats import load_original, lomar_from_original, lomar_to_original
from lomar.checkpoints.io import atomic_save, safe_load
from lomar.models import MAE, LoMaR
from lomar.models.masking import MaskingPlan, sample_plan
from lomar.models.vit import VisionTransformer, ViTConfig, list_models, model_config

__all__ = [
    "__version__",
    "atomic_save",
    "create_encoder",
    "export_encoder",
    "LoMaR",
    "MAE",
    "MaskingPlan",
    "ViTConfig",
    "VisionTransformer",
    "list_models",
    "load_original",
    "lomar_from_original",
    "lomar_to_original",
    "model_config",
    "safe_load",
    "sample_plan",
]
