"""The class check's reduced decode (lomar.data.decode_check.check_image) refuses exactly the files the training
decode (load_image) refuses, with its message, and decodes a JPEG at 1/8 to tell."""

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from helpers import photo_like
from lomar.data.decode import load_image, load_image_reduced
from lomar.data.decode_check import check_image


def _jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _kinds() -> dict[str, bytes]:
    photo = Image.fromarray(photo_like(48, 64))
    jpeg, png = _jpeg(photo), _png(photo)
    sideways = Image.Exif()
    sideways[0x0112] = 6  # a phone's portrait photo, stored sideways
    rotated = _jpeg(photo, exif=sideways.tobytes())
    return {
        "photo.jpg": jpeg,
        "truncated.jpg": jpeg[:len(jpeg) * 2 // 3],  # a partial download: the data runs out
        "cut_closed.jpg": jpeg[:len(jpeg) * 2 // 3] + b"\xff\xd9",  # ... then closed: libjpeg fills the rest grey
        "progressive_cut.jpg": _jpeg(photo, progressive=True)[:len(jpeg) // 2] + b"\xff\xd9",
        "photo.png": png,
        "truncated.png": png[:len(png) * 2 // 3],
        "empty.jpg": b"",
        "text.jpg": b"a text file with the name of a photo\n",
        "cmyk.jpg": _jpeg(photo.convert("CMYK")),
        "grey.jpg": _jpeg(photo.convert("L")),
        "16bit.png": _png(Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16))),
        "rotated.jpg": rotated,
        "rotated_cut_closed.jpg": rotated[:-120] + b"\xff\xd9",
        "mid_grey.jpg": _jpeg(Image.new("RGB", (64, 48), (128, 128, 128))),  # a grey corner, whole
    }


def _verdict(read, path) -> str | None:
    try:
        read(path)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    for name, data in _kinds().items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("limit", [None, ("LOMAR_MAX_IMAGE_BYTES", "2500"), ("LOMAR_MAX_IMAGE_PIXELS", "3000")])
def test_the_check_refuses_what_the_training_decode_refuses_with_its_message(files, monkeypatch, limit):
    if limit:  # every file over it but the small ones (bytes), all of them (pixels: 64x48 is 3,072)
        monkeypatch.setenv(*limit)
    verdicts = {path.name: (_verdict(load_image, path), _verdict(check_image, path)) for path in files.iterdir()}
    assert {name: full for name, (full, check) in verdicts.items() if full != check} == {}
    if limit is None:  # each kind is what its name says: the damaged ones refused, the others read
        assert sorted(name for name, (full, _) in verdicts.items() if full) == [
            "cut_closed.jpg", "empty.jpg", "rotated_cut_closed.jpg", "text.jpg", "truncated.jpg", "truncated.png"]


def test_a_cut_anywhere_is_refused_where_the_training_decode_refuses_it(tmp_path):
    """Every cut of the image data's last third, left open or closed by an EOI marker, of a baseline and a progressive
    JPEG (4:2:0): the check and both training decodes agree, file by file."""
    photo = Image.fromarray(photo_like(24, 40))
    disagree, refused, path = [], 0, tmp_path / "cut.jpg"
    for data in (_jpeg(photo), _jpeg(photo, progressive=True)):
        for end in range(len(data) * 2 // 3, len(data) - 2, 3):
            for tail in (b"", b"\xff\xd9"):
                path.write_bytes(data[:end] + tail)
                full = _verdict(load_image, path)
                refused += full is not None
                if {full, _verdict(check_image, path), _verdict(lambda p: load_image_reduced(p, 1), path)} != {full}:
                    disagree.append((end, tail))
    assert disagree == [] and refused > 50


def test_a_jpeg_is_checked_at_one_eighth(files, monkeypatch):
    scales, draft = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda img, mode, size: scales.append(img.size[0] // size[0]) or draft(img, mode, size))
    for name in ("photo.jpg", "rotated.jpg", "grey.jpg"):
        check_image(files / name)
    assert scales == [8, 8, 8]
