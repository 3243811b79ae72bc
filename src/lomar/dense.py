"""Documented import path of the dense-prediction backbones; the code lives in ``lomar.integrations.dense``."""

from lomar.integrations.dense import *  # noqa: F401,F403
from lomar.integrations.dense import __all__  # noqa: F401
