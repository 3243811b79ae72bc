"""Encoders and pretraining methods: the ViT, its position encodings, masking and objectives."""

from lomar.models.lomar import LoMaR
from lomar.models.mae import MAE

__all__ = ["LoMaR", "MAE"]
