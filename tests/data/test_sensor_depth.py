"""16-bit greyscale images of a 12-bit sensor: white where the file's sBIT chunk or MaxSampleValue tag says."""

import io

import numpy as np
from PIL import Image, PngImagePlugin

from lomar.data.decode import decode_bytes

LEVELS = [0, 1024, 2048, 4095]


def _twelve_bit(fmt: str, stated: bool) -> bytes:
    pixels = Image.fromarray(np.repeat(np.array(LEVELS, dtype=np.uint16), 4).reshape(4, 4))
    out = io.BytesIO()
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if stated:
            info.add(b"sBIT", bytes([12]))
        pixels.save(out, format="PNG", pnginfo=info)
    else:
        pixels.save(out, format="TIFF", tiffinfo={281: 4095} if stated else {})
    return out.getvalue()


def _greys(data: bytes) -> list[int]:
    return [int(v) for v in decode_bytes(data)[0, :, 0]]


def test_a_12_bit_image_that_says_so_fills_the_8_bit_range():
    for fmt in ("PNG", "TIFF"):
        assert _greys(_twelve_bit(fmt, stated=True)) == [0, 63, 127, 255], fmt  # value * 255 / 4095, truncated


def test_a_16_bit_image_that_states_no_depth_is_scaled_by_65535():
    for fmt in ("PNG", "TIFF"):
        assert _greys(_twelve_bit(fmt, stated=False)) == [0, 3, 7, 15], fmt


def test_an_sbit_of_16_or_out_of_range_keeps_65535():
    for bits in (16, 0, 17):
        pixels = Image.fromarray(np.full((4, 4), 4095, dtype=np.uint16))
        info = PngImagePlugin.PngInfo()
        info.add(b"sBIT", bytes([bits]))
        out = io.BytesIO()
        pixels.save(out, format="PNG", pnginfo=info)
        assert _greys(out.getvalue()) == [15] * 4, bits
