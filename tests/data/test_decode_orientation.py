"""Images decoded upright as their EXIF orientation says: every format, a TIFF turned once, a PNG's eXIf chunk
before its pixels read without decoding them, and a sideways photo about as fast as an upright one."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from crafted import png_chunk
from lomar.data.decode import (
    decode_bytes,
    open_pil,
    oriented_size,
)


def _rotated(fmt: str, size=(40, 24)) -> bytes:
    """An image stored ``size`` (width, height) whose EXIF says: rotate 90° for display (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(size[1], size[0], 3) * 255).astype(np.uint8)).save(
        out, format=fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {}))
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_every_format_is_decoded_as_its_exif_orientation_says(fmt):
    data = _rotated(fmt)
    with open_pil(data, "photo.jpg") as img:
        assert oriented_size(img) == (40, 24)
        upright = torch.from_numpy(np.asarray(ImageOps.exif_transpose(img).convert("RGB"))).permute(2, 0, 1)
    image = decode_bytes(data, "photo.jpg")
    assert image.shape == (3, 40, 24)
    if fmt != "JPEG":  # lossless: Pillow's rotation of the same pixels
        assert torch.equal(image, upright)


@pytest.mark.parametrize("keeps_tag", [False, True])
def test_a_tiff_is_turned_once_by_its_orientation_tag(monkeypatch, keeps_tag):
    """Pillow turns a TIFF upright as it loads it. Pillow 9.1-10.0 keep the tag after turning it, where an
    exif_transpose after the load would turn it again (6 and 8 upside down, 5 and 7 as stored): decode_bytes leaves
    the turn to Pillow whether or not the tag is left (keeps_tag: as those Pillows do; pyproject asks for a newer
    one)."""
    from PIL import TiffImagePlugin

    if keeps_tag:  # as those Pillows load a TIFF, on the Pillow installed here
        load_end = TiffImagePlugin.TiffImageFile.load_end

        def load_end_keeping_the_tag(img):
            orientation = img.tag_v2.get(0x0112)
            load_end(img)
            if orientation is not None:
                img.getexif()[0x0112] = orientation

        monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load_end", load_end_keeping_the_tag)
    stored = (np.random.RandomState(0).rand(24, 40, 3) * 255).astype(np.uint8)
    upright = {1: stored, 2: stored[:, ::-1], 3: stored[::-1, ::-1], 4: stored[::-1], 5: stored.transpose(1, 0, 2),
               6: np.rot90(stored, -1), 7: np.rot90(stored, 2).transpose(1, 0, 2), 8: np.rot90(stored, 1)}
    for orientation, want in upright.items():
        out, exif = io.BytesIO(), Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(stored).save(out, format="TIFF", exif=exif)
        assert np.array_equal(decode_bytes(out.getvalue(), "photo.jpg").permute(1, 2, 0).numpy(), want), orientation


def test_a_pngs_exif_before_its_pixels_is_read_without_decoding_them_and_a_malformed_one_is_ignored():
    """An eXIf chunk before IDAT is read at open (Pillow decodes the pixels only to look for one after them): a size
    read from the header stays a header read (200 ms on a 12 MP PNG). A malformed EXIF block is no orientation."""
    out, exif = io.BytesIO(), Image.Exif()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(out, format="PNG")
    data, exif[0x0112] = out.getvalue(), 6
    with open_pil(data[:33] + png_chunk(b"eXIf", exif.tobytes()) + data[33:], "photo.png") as img:
        assert oriented_size(img) == (6, 4) and img.tile  # turned, and not decoded
    iend = data.rindex(b"IEND") - 4
    for broken in (data[:33] + png_chunk(b"eXIf", b"MM\x00*junk") + data[33:],
                   data[:iend] + png_chunk(b"eXIf", b"MM\x00*junk") + data[iend:]):
        with open_pil(broken, "broken.png") as img:
            assert oriented_size(img) == (4, 6)
        assert decode_bytes(broken, "broken.png").shape == (3, 4, 6)


def test_a_photo_stored_sideways_decodes_about_as_fast_as_one_stored_upright():
    """Phones store a portrait photo sideways with orientation 6; turning it upright copied the whole
    transposed image, 10-15x the decode of a 6 MP photo (0.6 s against 0.04 s at 12 MP)."""
    import time

    pixels = np.random.RandomState(0).randint(0, 256, (60, 80, 3), np.uint8)
    photo = Image.fromarray(pixels).resize((2800, 2100), Image.Resampling.BILINEAR)
    files = {}
    for orientation in (1, 6):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out = io.BytesIO()
        photo.save(out, format="JPEG", quality=90, exif=exif)
        files[orientation] = out.getvalue()
    best = {1: float("inf"), 6: float("inf")}
    for _ in range(5):  # interleaved, the fastest of each: a loaded machine slows both alike
        for orientation, data in files.items():
            start = time.perf_counter()
            image = decode_bytes(data, "photo.jpg")
            best[orientation] = min(best[orientation], time.perf_counter() - start)
    assert image.shape == (3, 2800, 2100)
    assert best[6] < 3 * best[1], f"sideways {best[6] * 1e3:.0f} ms, upright {best[1] * 1e3:.0f} ms"
