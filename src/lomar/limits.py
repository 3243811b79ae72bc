"""Bounds on what a flag, a file or the environment may ask for; imports no torch."""

import os

__all__ = ["MAX_IMG_SIZE", "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_IMAGE_BYTES", "env_limit", "check_env_limits"]

# The largest image side: an --img-size, or the size a checkpoint's or export's settings give (an
# absolute position table and every activation grow with it). Far above what the method is run at
# (the backbone benchmarks go to 2048 px), far below what would take the machine down first.
MAX_IMG_SIZE = 8192

# Pillow's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS): ~13k x 13k.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
# Far above a compressed photograph at the pixel limit (a 13k x 13k JPEG takes tens of MB), far
# below what would strain a loader worker; an uncompressed one (~540 MB) needs it raised.
DEFAULT_MAX_IMAGE_BYTES = 256 * 2**20
_ENV_LIMITS = {"LOMAR_MAX_IMAGE_PIXELS": DEFAULT_MAX_IMAGE_PIXELS, "LOMAR_MAX_IMAGE_BYTES": DEFAULT_MAX_IMAGE_BYTES}


def env_limit(name: str) -> int:
    """The environment's ``LOMAR_MAX_IMAGE_PIXELS`` or ``LOMAR_MAX_IMAGE_BYTES`` (a positive integer) or its
    default; ValueError naming the variable otherwise."""
    default, value = _ENV_LIMITS[name], os.environ.get(name)
    if value is None:
        return default
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; unset it or set e.g. {default} "
                         f"(the default)")
    return limit


def check_env_limits() -> None:
    """Every command checks the environment's limits before any work (else each image would fail on them)."""
    for name in _ENV_LIMITS:
        env_limit(name)
