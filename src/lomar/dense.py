"""Documented import path of the dense-prediction backbones; the code lives in ``lomar.models.backbones`` (the
pyramid, the maps) and ``lomar.integrations.dense`` (the backbones read from a checkpoint or export)."""

from lomar.integrations.dense import *  # noqa: F401,F403
from lomar.integrations.dense import __all__ as _integrations
from lomar.models.backbones import *  # noqa: F401,F403
from lomar.models.backbones import __all__ as _models

__all__ = [*_models, *_integrations]
