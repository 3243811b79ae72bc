"""The value that is white in a 16-bit greyscale image: what its file says its sensor's depth is, else 65535.

A 12-bit camera or microscope writes its 0-4095 into 16-bit samples. Scaled by 65535, such an image reaches 16 of 255:
near-black, in 16 grey levels. PNG records the bits a sample really holds in its sBIT chunk, TIFF the largest value in
its MaxSampleValue tag; where either says fewer than 16 bits, that depth is white. Neither is read from the pixels:
an image's brightness never sets its scale, so a dark frame stays dark beside a bright one of the same sensor.
"""

from __future__ import annotations

from PIL import Image

from lomar.data.png_cut import png_chunks

__all__ = ["FULL", "white_level"]

FULL = 65535
_MAX_SAMPLE_VALUE = 281  # TIFF tag
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_bits(data: bytes) -> int | None:
    """The significant bits of a greyscale PNG's sample from its sBIT chunk (before the pixel data), if any."""
    for kind, at, length in png_chunks(data):
        if kind in (b"IDAT", b"IEND"):
            return None
        if kind == b"sBIT" and length >= 1 and at < len(data):
            return data[at]
    return None


def white_level(img: Image.Image, data: bytes) -> int:
    """The sample value of ``img`` (a 16-bit greyscale image decoded from ``data``, perhaps a turned copy, which has
    no format) that is white: 2^bits - 1 for a PNG whose sBIT chunk gives 1-15 bits, a TIFF's MaxSampleValue tag
    between 1 and 65534, else :data:`FULL`."""
    if data.startswith(_PNG_SIGNATURE):
        bits = _png_bits(data)
        return (1 << bits) - 1 if bits is not None and 1 <= bits < 16 else FULL
    value = getattr(img, "tag_v2", {}).get(_MAX_SAMPLE_VALUE)  # a TIFF's tags (Pillow turns a TIFF as it loads it)
    value = value[0] if isinstance(value, tuple) and value else value
    return int(value) if isinstance(value, int) and 1 <= value < FULL else FULL
