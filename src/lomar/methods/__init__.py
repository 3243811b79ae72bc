"""Pretraining methods: each a model that returns its own loss."""

from .lomar import LoMaR, LoMaROutput
from .mae import MAE, MAEOutput

__all__ = ["LoMaR", "LoMaROutput", "MAE", "MAEOutput"]
