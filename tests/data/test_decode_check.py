"""The class check's reduced decode (lomar.data.decode_check.check_image) refuses exactly the files the training
decode (load_image) and the --decode draft load refuse, with their message, and decodes a JPEG at 1/8 to tell; a class
folder read by either is checked that way."""

import io
from functools import partial

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from helpers import photo_like
from lomar.data.classify import classification_transforms, draft_eval_load
from lomar.data.decode import load_image, load_image_reduced
from lomar.data.decode_check import check_image
from lomar.data.folder import LabelledImageFolder


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
    # the draft load at 1/8 (min_side 1) and whole (min_side 48: no scale keeps it)
    reads = (check_image, partial(load_image_reduced, min_side=1), partial(load_image_reduced, min_side=48))
    verdicts = {path.name: [_verdict(read, path) for read in (load_image, *reads)] for path in files.iterdir()}
    assert {name: full for name, (full, *others) in verdicts.items() if others != [full] * 3} == {}
    if limit is None:  # each kind is what its name says: the damaged ones refused, the others read
        assert sorted(name for name, (full, *_) in verdicts.items() if full) == [
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


def test_a_class_folder_read_by_the_draft_load_is_checked_at_one_eighth(tmp_path, monkeypatch):
    """finetune's --decode draft validation load (a JPEG at 1/2 here, for a 73 px resize) refuses what load_image
    refuses: its classes are checked by the 1/8 decode, as knn's and linprobe's; a load of another verdict (its own
    pixel limit, any other callable) is its own check."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(photo_like(192, 256)).save(tmp_path / name / "photo.jpg", quality=90)
    scales, draft = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda img, mode, size: scales.append(img.size[0] // size[0]) or draft(img, mode, size))
    val_tf = classification_transforms(64)[1]
    folder = LabelledImageFolder(tmp_path, val_tf, draft_eval_load(val_tf))
    assert folder.unreadable_classes() == {} and scales == [8, 8]
    scales.clear()
    assert folder[0][0].shape == (3, 64, 64) and scales == [2]  # what it reads: the draft scale
    own = partial(load_image_reduced, min_side=73, max_pixels=10**6)
    assert LabelledImageFolder(tmp_path, load=own).check is own


def _pillow_kinds() -> dict[str, bytes]:
    """Files Pillow decodes (PNG, TIFF, BMP, GIF, a turned WebP) of every mode whose conversion to RGB differs, whole
    and cut: the ones load_image refuses after decoding (a float TIFF, a signed one) among them."""
    photo = Image.fromarray(photo_like(24, 32))
    turned = Image.Exif()
    turned[0x0112] = 6
    wide = Image.fromarray((np.arange(24 * 32).reshape(24, 32) * 7).astype(np.uint16))
    images = {**{mode: photo.convert(mode) for mode in ("1", "LA", "P", "RGBA", "CMYK", "YCbCr")}, "I16": wide,
              "LAB": Image.new("LAB", (32, 24), (50, 10, 10)),
              "signed": Image.fromarray((np.arange(24 * 32).reshape(24, 32) - 100).astype(np.int32)),
              "float": Image.fromarray(np.linspace(0, 1, 24 * 32, dtype=np.float32).reshape(24, 32))}
    kinds = {f"{mode}.tif": _save(image, "TIFF", compression="tiff_lzw") for mode, image in images.items()}
    kinds.update({f"{mode}.png": _save(images[mode], "PNG") for mode in ("1", "LA", "P", "RGBA", "I16")})
    kinds.update({"P_transparent.png": _save(photo.convert("P"), "PNG", transparency=3),
                  "turned.png": _save(photo, "PNG", exif=turned.tobytes()), "turned.webp": _save(
                      photo, "WEBP", exif=turned.tobytes()), "photo.bmp": _save(photo, "BMP"),
                  "photo.gif": _save(photo, "GIF"), "turned.tif": _save(photo, "TIFF", exif=turned.tobytes())})
    return {**kinds, **{f"cut_{name}": data[:len(data) * 2 // 3] for name, data in kinds.items()}}


def _save(image: Image.Image, kind: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, kind, **options)
    return out.getvalue()


def test_a_file_pillow_decodes_is_refused_where_load_image_refuses_it_without_its_whole_conversion(tmp_path,
                                                                                                  monkeypatch):
    """check_bytes: decode_bytes' verdict and message, the decoded image's conversion tried on a 1x1 crop of it
    (mode, palette and transparency pick Pillow's converter), not on the whole image."""
    import lomar.data.decode as decode

    for name, data in _pillow_kinds().items():
        (tmp_path / name).write_bytes(data)
    verdicts = {path.name: (_verdict(load_image, path), _verdict(check_image, path)) for path in tmp_path.iterdir()}
    assert {name: full for name, (full, check) in verdicts.items() if full != check} == {}
    refused = sorted(name for name, (full, _) in verdicts.items() if full)
    assert {"float.tif", "signed.tif"} <= set(refused) and len(refused) >= len(verdicts) // 2
    converted, convert = [], decode.pil_to_tensor
    monkeypatch.setattr(decode, "pil_to_tensor", lambda image: converted.append(image.size) or convert(image))
    for name in ("RGBA.png", "turned.png", "P.tif", "photo.bmp"):
        check_image(tmp_path / name)
    assert converted == [(1, 1)] * 4
