"""Image files the usual fixtures do not hold: float and 32-bit TIFFs, files of another format under an image's
name (HEIC, a JPEG named PNG), scan bombs, damaged EXIF, palette PNGs with transparency, and decode errors without a
message of their own."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from odd_files import _jpeg
from PIL import Image

from crafted import png_chunk
from lomar.data.decode import decode_bytes
from lomar.data.fast_decode import FastPretrainDataset
from lomar.data.folder import ImageListDataset
from lomar.data.transforms import PretrainTransform


def test_a_floating_point_tiff_is_refused_not_clipped_to_black(tmp_path):
    out = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).rand(40, 60).astype(np.float32)).save(out, format="TIFF")  # 0..1
    with pytest.raises(ValueError, match=r"t.tif: a 32-bit floating-point image has no known value range; convert"):
        decode_bytes(out.getvalue(), "t.tif")
    (tmp_path / "t.tif").write_bytes(out.getvalue())
    masker = lambda gen: {"top_left": torch.zeros(1, 2, dtype=torch.long), "mask": torch.zeros(4)}  # noqa: E731
    base = ImageListDataset([tmp_path / "t.tif"], PretrainTransform(16), masker=masker)
    for dataset in (base, FastPretrainDataset(base, "windows", patch_size=2, window_size=2, num_windows=1)):
        assert dataset[0]["image"] is None and "floating-point" in dataset[0]["why"]


def test_an_annotation_with_a_broken_chunk_is_one_line_naming_it(tmp_path):
    from lomar.data.segmentation import read_labels

    pixels = zlib.compress(b"".join(b"\0" + bytes(range(8)) for _ in range(8)))
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    # the pixel data goes on in a chunk with a garbled type: Pillow raises SyntaxError while decoding, not OSError
    body = png_chunk(b"IDAT", pixels[:10]) + png_chunk(b"\x99\xae\xe9\x81", pixels[10:]) + png_chunk(b"IEND", b"")
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + body)
    with pytest.raises(ValueError, match=r"annotation .*a.png cannot be read \(broken PNG file .*\); rewrite it as a"):
        read_labels(tmp_path / "a.png")


def test_a_file_of_another_format_named_as_an_image_reaches_no_other_pillow_plugin(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    rendered = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: rendered.append(a))  # EPS is run by gs
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    ppm, ico = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(ppm, format="PPM")
    Image.new("RGB", (16, 16), "red").save(ico, format="ICO")
    for data in (eps, ppm.getvalue(), ico.getvalue()):
        with pytest.raises(ValueError, match=r"photo.jpg: not an image format lomar reads \(JPEG, PNG, GIF, BMP, TIFF"):
            decode_bytes(data, "photo.jpg")
    assert not rendered
    mpo = io.BytesIO()  # a camera's JPEG of two pictures: Pillow's JPEG opener names it MPO
    Image.new("RGB", (30, 20), "red").save(mpo, format="MPO", save_all=True,
                                           append_images=[Image.new("RGB", (30, 20), "blue")])
    assert decode_bytes(mpo.getvalue(), "camera.jpg").shape == (3, 20, 30)


def test_a_heic_or_avif_photo_named_as_a_jpeg_is_named_by_its_format(tmp_path):
    """A phone's HEIC (or HEIF, AVIF, JPEG XL) named .jpg is named by its format, where 'not an image format lomar reads
    (... starting b'\\x00\\x00\\x00\\x18ftyp')' would leave the user to decode the bytes."""
    box = b"\x00\x00\x00\x18ftyp{}\x00\x00\x00\x00mif1heic" + bytes(64)
    for brand, name in ((b"heic", "HEIC"), (b"mif1", "HEIF"), (b"avif", "AVIF")):
        with pytest.raises(ValueError, match=rf"^cannot decode image IMG_1.jpg: it is a photo in {name}, a format "
                                             rf"lomar does not read \(JPEG, PNG, GIF, BMP, TIFF, WebP\); convert it to "
                                             rf"JPEG or PNG$"):
            decode_bytes(box.replace(b"{}", brand), "IMG_1.jpg")
    with pytest.raises(ValueError, match=r"in JPEG XL, a format"):
        decode_bytes(b"\xff\x0a" + bytes(64), "IMG_2.jpg")
    with pytest.raises(ValueError, match=r"not an image format lomar reads"):  # an MP4 is not a photo
        decode_bytes(box.replace(b"{}", b"isom"), "clip.jpg")


def test_a_jpeg_of_a_thousand_repeated_scans_is_refused_before_libjpeg_works_through_them():
    out = io.BytesIO()
    Image.new("L", (64, 64), 128).save(out, format="JPEG", progressive=True)
    data = out.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"]
    end = data.rfind(b"\xff\xd9")
    scan = data[starts[-1]:end]  # each copy is decoded over the whole frame again: minutes on a large one
    assert decode_bytes(data, "ok.jpg").shape == (3, 64, 64)
    with pytest.raises(ValueError, match=r"bomb.jpg: a JPEG of 1,00\d scans, over the 100 any encoder writes"):
        decode_bytes(data[:end] + scan * 1000 + data[end:], "bomb.jpg")


def _exif_jpeg(orientation: int, count: bytes = b"\x00\x00\x00\x01") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray((np.random.RandomState(1).rand(20, 40, 3) * 255).astype(np.uint8)).save(
        out, format="JPEG", quality=95, exif=exif)
    entry = b"\x01\x12\x00\x03\x00\x00\x00\x01"  # orientation, SHORT, count 1 (Pillow writes big-endian "MM")
    assert entry in out.getvalue()
    return out.getvalue().replace(entry, entry[:4] + count)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_pixels_are_turned_as_pillow_turns_them(orientation):
    from PIL import ImageOps

    stored = decode_bytes(_exif_jpeg(1), "exif.jpg")
    upright = Image.fromarray(stored.permute(1, 2, 0).numpy())
    upright.getexif()[0x0112] = orientation
    upright.info["exif"] = upright.getexif().tobytes()
    want = torch.from_numpy(np.array(ImageOps.exif_transpose(upright))).permute(2, 0, 1)
    assert torch.equal(decode_bytes(_exif_jpeg(orientation), "exif.jpg"), want)


def test_a_damaged_exif_block_turns_the_pixels_as_the_header_size_says():
    from lomar.data.decode import open_pil, oriented_size

    data = _exif_jpeg(6, count=b"\xf4\x00\x00\x01")  # an absurd count: Pillow skips the tag, libjpeg's reader did not
    with open_pil(data, "wide.jpg") as img:
        size = oriented_size(img)
    # not (40, 20): labels checked on 20x40 would misfit
    assert tuple(decode_bytes(data, "wide.jpg").shape[1:]) == size == (20, 40)


def test_an_annotation_that_is_a_jpeg_named_png_is_refused(tmp_path):
    from lomar.data.segmentation import read_labels

    y, x = np.mgrid[0:100, 0:100]
    labels = np.where((x - 47) ** 2 + (y - 53) ** 2 < 30 ** 2, 12, 3).astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "a.png", format="JPEG")  # 12 and 3 ring into 0..15 along the circle
    with Image.open(tmp_path / "a.png") as image:
        assert (np.asarray(image) != labels).any()
    with pytest.raises(ValueError, match=r"annotation .*a.png is a JPEG file, whose lossy compression can change "
                                         r"class ids along edges; write class ids as a PNG"):
        read_labels(tmp_path / "a.png")


def test_a_palette_png_with_transparency_decodes_without_pillows_warning():
    import warnings

    from PIL import ImageOps

    image = Image.fromarray((np.random.RandomState(0).rand(20, 30, 3) * 255).astype(np.uint8)).convert("P")
    out = io.BytesIO()
    image.save(out, format="PNG", transparency=bytes([0, 255, 128] + [255] * 253))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. 'Palette images with Transparency expressed in bytes should be ...'
        pixels = decode_bytes(out.getvalue(), "t.tif")
    via_rgba = ImageOps.exif_transpose(Image.open(io.BytesIO(out.getvalue())).convert("RGBA")).convert("RGB")
    assert torch.equal(pixels, torch.from_numpy(np.array(via_rgba)).permute(2, 0, 1))


def test_a_damaged_exif_block_is_read_without_pillows_warnings():
    import warnings

    from lomar.data.decode import exif_orientation, open_pil

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_pil(_exif_jpeg(6, count=b"\xf4\x00\x00\x01"), "exif.jpg") as img:
            assert exif_orientation(img) == 1  # the tag Pillow skips
    assert not caught  # no 'Tag data larger than file. Skipping tag 274' from every loader worker


@pytest.mark.parametrize("low, high", [(-1024, 3000), (0, 70000)])
def test_a_32_bit_integer_image_outside_16_bits_is_refused_not_clipped(low, high):
    out = io.BytesIO()  # a CT slice in Hounsfield units (signed), or counts wider than 16 bits
    Image.fromarray(np.linspace(low, high, 40 * 60).reshape(40, 60).astype(np.int32)).save(out, format="TIFF")
    with pytest.raises(ValueError, match=rf"ct.tif: a 32-bit integer image with values from {low} to {high} has no "
                                         r"known range; convert it to 8 or 16 bits"):
        decode_bytes(out.getvalue(), "ct.tif")
    inside = io.BytesIO()  # 0..65535 in a 32-bit container: scaled by 16 bits, as before
    Image.fromarray(np.full((4, 4), 65535, np.int32)).save(inside, format="TIFF")
    assert int(decode_bytes(inside.getvalue(), "inside.tif")[0, 0, 0]) == 255


def test_window_decoding_of_a_palette_png_with_transparency_prints_no_pillow_warning(tmp_path):
    import warnings

    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)).convert("P")
    image.save(tmp_path / "p.png", transparency=bytes([0, 255, 128] + [255] * 253))
    masker = lambda gen: {"top_left": torch.zeros(1, 2, dtype=torch.long), "mask": torch.zeros(4)}  # noqa: E731
    base = ImageListDataset([tmp_path / "p.png"], PretrainTransform(32), masker=masker)
    windows = FastPretrainDataset(base, "windows", patch_size=2, window_size=2, num_windows=1)
    assert windows.sparse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert windows[0]["image"].shape == (3, 32, 32)


def test_only_a_jpeg_libjpeg_may_read_several_scans_of_is_counted():
    """Counting scans reads the whole file (10 ms for a 10 MB photo, every time a worker opens it): a sequential
    frame whose first scan holds every component has one scan, as libjpeg refuses a second (JERR_EOI_EXPECTED)."""
    from lomar.data.headers import jpeg_single_scan

    pixels = (np.random.RandomState(0).rand(48, 64, 3) * 255).astype(np.uint8)
    for mode, progressive in (("RGB", False), ("L", False), ("RGB", True), ("L", True)):
        out = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(out, format="JPEG", progressive=progressive)
        assert jpeg_single_scan(out.getvalue()) is not progressive
    assert not jpeg_single_scan(b"\xff\xd8\xff\xd9") and not jpeg_single_scan(_jpeg()[:40])
    out = io.BytesIO()
    Image.new("RGB", (640, 480), (128, 100, 50)).save(out, format="JPEG")
    data = out.getvalue()
    start, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    scan = data[start:start + 2 + int.from_bytes(data[start + 2:start + 4], "big") + 17]  # 31 bytes, as the bomb's
    with pytest.raises(ValueError, match="bomb.jpg: broken data stream"):  # libjpeg's own refusal, at the second
        decode_bytes(data[:end] + scan * 1000 + data[end:], "bomb.jpg")


def test_an_image_pillow_fails_to_decode_with_its_own_value_error_is_named():
    # a GIF whose frame is 0x0 (found by mutating frame headers): Pillow's ValueError at load names no file, and
    # finetune's, detect's and segment's skip warnings print the message alone
    out = io.BytesIO()
    Image.new("P", (4, 3), 1).save(out, format="GIF")
    data = bytearray(out.getvalue())
    frame = data.index(b"\x2c", 13)  # the image descriptor: left, top, width, height (little-endian)
    struct.pack_into("<HH", data, frame + 5, 0, 0)
    with pytest.raises(ValueError, match=r"^cannot decode image frame\.gif: tile cannot extend outside image$"):
        decode_bytes(bytes(data), "frame.gif")


def test_a_skipped_sample_whose_error_has_no_message_is_named_by_the_errors_type(caplog):
    """A damaged file can raise an exception without a message (an EOFError(), a SyntaxError without text): the
    skip line quotes its type, where taking the first line of an empty message failed with an IndexError inside a
    loader worker (errors.exception_line, which every decode message quotes an exception by)."""
    from lomar.data.collate import Skipped
    from lomar.errors import exception_line

    assert Skipped.warned(EOFError(), 3, set()) == "EOFError"
    assert exception_line(ValueError("cannot decode image a.png: broken\ntraceback-like detail")) == (
        "cannot decode image a.png: broken")
