"""pil_to_tensor: every Pillow mode comes out as Pillow's own RGB conversion, in a tensor of its own, laid out as
torchvision's decode_jpeg lays out a JPEG."""
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lomar.data.decode import decode_bytes, pil_to_tensor


def _image(mode: str) -> Image.Image:
    """A 7x5 image of ``mode`` whose pixels differ (so a skipped or wrong conversion shows)."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    if mode == "P+transparency":
        image = rgb.quantize(16)
        image.info["transparency"] = 2
        return image
    if mode == "I;16":
        return Image.fromarray(np.arange(35, dtype=np.uint16).reshape(5, 7) * 1000)
    if mode == "RGB+transparency":
        rgb.info["transparency"] = (1, 2, 3)
        return rgb
    return rgb.convert(mode)


# YCbCr, HSV and LAB have three bands as RGB has: taking their bytes unconverted keeps the shape but not the colours
MODES = ["1", "L", "LA", "P", "P+transparency", "PA", "RGB", "RGB+transparency", "RGBA", "RGBa", "RGBX",
         "CMYK", "YCbCr", "HSV", "LAB", "I", "I;16"]


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_is_pillows_rgb_conversion_in_a_tensor_of_its_own(mode):
    image = _image(mode)
    before = image.tobytes()
    with warnings.catch_warnings():  # Pillow's palette-transparency advice stays inside (every worker prints it)
        warnings.simplefilter("error")
        pixels = pil_to_tensor(image)
    expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 5, 7)
    assert pixels.stride() == (1, 21, 3)  # channels last, as torchvision's decode_jpeg gives a JPEG
    assert torch.equal(pixels, expected)
    again = pil_to_tensor(image)
    pixels += 1  # writable, and shared with neither the image nor another call's tensor
    assert image.tobytes() == before and torch.equal(again, expected)


@pytest.mark.parametrize("mode, values", [("I;16", [0, 1, 257, 30000, 65535]), ("I", [0, 7, 255, 128, 3]),
                                          ("I", [0, 300, 65535, 40000, 1])])
def test_a_wide_image_decodes_as_pillows_rgb_of_its_8_bit_grey(mode, values):
    """16-bit (and 32-bit within 16 bits) greys scaled to 8 bits, then made RGB as Pillow's L to RGB makes them."""
    wide = np.array(values * 7, dtype=np.uint16 if mode == "I;16" else np.int32).reshape(5, 7)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, "TIFF")
    scaled = wide.astype(np.float64) / (255.0 if mode == "I" and wide.max() <= 255 else 65535.0) * 255.0
    grey = Image.fromarray(scaled.clip(0, 255).astype(np.uint8))
    expected = torch.from_numpy(np.array(grey.convert("RGB"))).permute(2, 0, 1)
    pixels = decode_bytes(buffer.getvalue(), "grey.tif")
    assert torch.equal(pixels, expected)
    pixels += 1  # its own memory: no channel is a view of another
    assert torch.equal(pixels, expected + 1)
