"""Documented import path of the timm registry entries; the code lives in ``lomar.integrations.timm``.

``import lomar.timm_models`` registers ``lomar_vit_*`` with timm.
"""

from lomar.integrations.timm import *  # noqa: F401,F403
from lomar.integrations.timm import __all__  # noqa: F401
