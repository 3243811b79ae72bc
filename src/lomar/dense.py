"""Documented import path of the dense-prediction backbones; the code lives in ``lomar.models.dense``."""

from lomar.models.dense import *  # noqa: F401,F403
from lomar.models.dense import __all__  # noqa: F401
