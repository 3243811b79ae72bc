"""Decoding image files and bytes into uint8 RGB tensors, with a pixel limit.

torchvision decodes (fast, EXIF-aware); Pillow is the fallback for the modes it refuses (CMYK,
16-bit, palette oddities). Before anything is decoded the header's size is checked against
:func:`max_image_pixels`, so a small crafted file cannot expand into gigabytes.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "DEFAULT_MAX_IMAGE_PIXELS", "is_image_name", "max_image_pixels", "decode_bytes",
           "load_image", "load_pil", "check_image_size"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Pillow's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS): ~13k x 13k.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def max_image_pixels() -> int:
    """The largest image decoded: ``LOMAR_MAX_IMAGE_PIXELS`` if set (a positive integer), else the default."""
    value = os.environ.get("LOMAR_MAX_IMAGE_PIXELS")
    if value is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ValueError(f"LOMAR_MAX_IMAGE_PIXELS must be a positive integer, got {value!r}")
    return limit


def _header_size(data: bytes, name: str, limit: int) -> tuple[int, int] | None:
    """(width, height) from the header without decoding; None if Pillow does not know the format."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Image.DecompressionBombError as exc:  # over Pillow's own global limit, which we do not change
        found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(exc))
        pixels, pil_limit = (int(found[1]), int(found[2])) if found else (0, limit)
        raise ValueError(f"cannot decode image {name}: {pixels:,} pixels is over the limit of "
                         f"{min(limit, pil_limit):,} (Pillow refuses it as a possible decompression bomb); "
                         f"shrink it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _check_pixels(name: str, width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise ValueError(f"cannot decode image {name}: {width}x{height} = {width * height:,} pixels is over the "
                         f"limit of {limit:,}; shrink it or raise LOMAR_MAX_IMAGE_PIXELS")


def _pil_decode(data: bytes, name: str) -> torch.Tensor:
    """Pillow fallback for what torchvision cannot decode (CMYK, 16-bit, odd modes)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img_file = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # Pillow's own message names an anonymous BytesIO: say what the file is instead.
        raise ValueError(f"cannot decode image {name}: not an image format Pillow or torchvision can read "
                         f"({len(data):,} bytes starting {data[:8]!r})") from None
    with img_file as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            arr = arr / (65535.0 if arr.max() > 255 else 255.0) * 255.0
            img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def decode_bytes(data: bytes, name: str = "<bytes>", max_pixels: int | None = None) -> torch.Tensor:
    """Encoded image bytes -> uint8 (3, H, W) RGB; ValueError naming ``name`` when undecodable or too large.

    ``max_pixels`` (default :func:`max_image_pixels`) bounds width x height, checked on the
    header before decoding.
    """
    if not data:
        raise ValueError(f"cannot decode image {name}: the file is empty (0 bytes)")
    limit = max_pixels if max_pixels is not None else max_image_pixels()
    size = _header_size(data, name, limit)
    if size is not None:
        _check_pixels(name, *size, limit)
    try:
        with warnings.catch_warnings():  # torchvision announces its decoders' move to torchcodec: noise
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_image  # lazy: torchvision is slow to import

            # EXIF orientation: phone photos are often stored sideways with a rotation tag.
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                 apply_exif_orientation=True)
        if image.dtype != torch.uint8:  # 16-bit PNG
            image = (image.to(torch.int32) >> 8).to(torch.uint8)
        if image.ndim == 4:  # animated GIF: first frame
            image = image[0]
        if image.shape[0] == 3 and image.numel() > 0:
            if size is None:  # a format only torchvision knows: checked after the fact
                _check_pixels(name, image.shape[-1], image.shape[-2], limit)
            return image
    except ValueError as exc:
        if "over the limit" in str(exc):
            raise
    except Exception:  # torchvision refuses: try Pillow below
        pass
    try:
        return _pil_decode(data, name)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot decode image {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from exc


def load_image(path: str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """Read and decode an image file: uint8 (3, H, W) RGB; ValueError naming the file when unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_bytes(data, str(path), max_pixels)


def load_pil(path: str | Path, max_pixels: int | None = None):
    """:func:`load_image` as an RGB ``PIL.Image`` (what timm's and torchvision's transforms take)."""
    from PIL import Image

    return Image.fromarray(load_image(path, max_pixels).permute(1, 2, 0).numpy())


def check_image_size(name: str, width: int, height: int, max_pixels: int | None = None) -> None:
    """ValueError naming ``name`` when ``width`` x ``height`` (read from a header, before decoding) is over
    ``max_pixels`` (default :func:`max_image_pixels`), with the message of the decoders here."""
    _check_pixels(name, width, height, max_pixels if max_pixels is not None else max_image_pixels())
