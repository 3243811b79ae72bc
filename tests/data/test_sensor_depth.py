"""16-bit greyscale images of a 12-bit sensor are scaled by 65535 whatever their sBIT chunk or MaxSampleValue tag say.

PNG stores a lower original depth scaled up to the full 16 bits (its spec's sample depth scaling: bit replication or a
shift, as libpng's png_set_shift); sBIT only lets a decoder recover the original bits. TIFF 6.0's MaxSampleValue is
"used only for statistical purposes", not to affect the image's appearance (a writer may store the image's own max).
Read as the white level, a compliant 12-bit PNG came out white and a TIFF was scaled by its brightest pixel.
"""

import io

import numpy as np
from PIL import Image, PngImagePlugin

from lomar.data.decode import decode_bytes

LEVELS = np.array([0, 1024, 2048, 4095], dtype=np.uint16)  # a 12-bit sensor's values


def _image(samples: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(samples.astype(np.uint16), 4).reshape(4, 4))


def _png(samples: np.ndarray, sbit: int | None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))
    out = io.BytesIO()
    _image(samples).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _tiff(samples: np.ndarray, max_sample_value: int | None) -> bytes:
    out = io.BytesIO()
    _image(samples).save(out, format="TIFF", tiffinfo={} if max_sample_value is None else {281: max_sample_value})
    return out.getvalue()


def _greys(data: bytes) -> list[int]:
    return [int(v) for v in decode_bytes(data, "deep.png")[0, :, 0]]


def test_a_png_that_states_12_bits_as_its_spec_stores_them_is_scaled_by_65535():
    replicated = (LEVELS << 4) | (LEVELS >> 8)  # left bit replication: 4095 -> 65535
    assert _greys(_png(replicated, 12)) == [0, 63, 127, 255]  # value * 255 / 65535, truncated; not clipped white
    assert _greys(_png(LEVELS << 4, 12)) == [0, 63, 127, 254]  # shifted up (png_set_shift)


def test_a_tiff_max_sample_value_does_not_set_the_scale():
    assert _greys(_tiff(LEVELS, 4095)) == [0, 3, 7, 15]
    full = np.array([0, 10000, 20000, 40000])  # a writer that stored the image's own max
    assert _greys(_tiff(full, 40000)) == _greys(_tiff(full, None)) == [0, 38, 77, 155]


def test_a_16_bit_image_that_states_no_depth_is_scaled_by_65535():
    assert _greys(_png(LEVELS, None)) == _greys(_tiff(LEVELS, None)) == [0, 3, 7, 15]


def test_an_sbit_of_16_or_out_of_range_keeps_65535():
    for bits in (16, 0, 17):
        assert _greys(_png(np.full(4, 4095), bits)) == [15] * 4, bits
