"""Decoding's guards: the pixel limit (per call or from the environment) read from a header, undecodable bytes
named, damaged PNGs (a broken IDAT, a zeroed CRC) and cut-short JPEGs refused on every decode path rather than
decoded into garbage, and 16-bit images scaled by their depth."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from crafted_pngs import _png
from PIL import Image
from torch.utils.data import DataLoader

from crafted import png_chunk
from lomar.data.collate import collate_labelled
from lomar.data.decode import (
    decode_box_reduced,
    decode_bytes,
    load_image,
    load_image_reduced,
    max_image_pixels,
    open_pil,
    oriented_size,
)
from lomar.data.folder import LabelledImageFolder, build_pretrain_dataset


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a few bytes): a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_a_huge_image_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(20000, 20000))
    with pytest.raises(ValueError, match=r"bomb.png: (20000x20000 = )?400,000,000 pixels is over the limit"):
        load_image(bomb)


def test_the_pixel_limit_is_per_call_or_from_the_environment(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    before = PILImage.MAX_IMAGE_PIXELS
    path = _png(tmp_path / "small.png", (20, 30))
    assert load_image(path).shape == (3, 20, 30)
    with pytest.raises(ValueError, match="small.png: 30x20 = 600 pixels is over the limit of 599"):
        load_image(path, max_pixels=599)
    monkeypatch.setenv("LOMAR_MAX_IMAGE_PIXELS", "100")
    assert max_image_pixels() == 100
    with pytest.raises(ValueError, match="over the limit of 100; shrink it or raise LOMAR_MAX_IMAGE_PIXELS"):
        load_image(path)
    monkeypatch.setenv("LOMAR_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="LOMAR_MAX_IMAGE_PIXELS must be a positive integer, got 'lots'"):
        max_image_pixels()
    assert PILImage.MAX_IMAGE_PIXELS == before  # no global state changed


@pytest.mark.parametrize("data, words", [
    (b"", "the file is empty"),
    (b"this is not an image at all", "not an image format"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "cannot decode image photo.png"),
])
def test_undecodable_bytes_name_the_file(data, words):
    with pytest.raises(ValueError, match=words) as info:
        decode_bytes(data, "photo.png")
    assert "BytesIO" not in str(info.value) and "photo.png" in str(info.value)
    with pytest.raises(ValueError, match=words):  # what --decode draft / windows / gpu read first
        open_pil(data, "photo.png")


def test_a_png_whose_pixel_data_breaks_is_skipped_by_every_reader_that_reads_its_orientation(tmp_path):
    """Pillow's PNG reader decodes the pixels to find an EXIF chunk after them; once that failed, its next decode
    gave the rows before the damage and zeros, without an error: --decode windows trained on what full skips."""
    from lomar.data.fast_decode import FastPretrainDataset
    from lomar.methods import get_method

    y, x = np.mgrid[0:64, 0:96]
    out = io.BytesIO()
    Image.fromarray(np.stack([x * 2, y * 3, x + y], -1).astype(np.uint8)).save(out, format="PNG")
    data = out.getvalue()
    start = data.index(b"IDAT")
    end = start + 4 + int.from_bytes(data[start - 4:start], "big")
    at = (start + end) // 2
    broken = data[:at] + b"\xff" * 4 + data[at + 4:end]  # an encoder's fault: the chunk's CRC matches its bytes
    (tmp_path / "broken.png").write_bytes(broken + struct.pack(">I", zlib.crc32(broken[start:])) + data[end + 4:])
    with open_pil((tmp_path / "broken.png").read_bytes(), "broken.png") as img, pytest.raises(OSError):
        oriented_size(img)

    class Windows:  # two 2x2-patch windows of an 8x8 grid: sparse, so the windows path reads the PNG itself
        window_size, windows, mask_ratio = 2, 2, 0.75
    base = build_pretrain_dataset(str(tmp_path), 64, seed=1, masker=get_method("lomar").masker(Windows(), (8, 8)))
    windows = FastPretrainDataset(base, "windows", patch_size=8, window_size=2, num_windows=2)
    assert windows.sparse and base[(0, 0)]["image"] is None
    assert windows[(0, 0)]["image"] is None and "broken data stream" in windows[(0, 0)]["why"]


def test_a_png_damaged_on_disk_is_refused_by_its_crc_not_decoded_into_garbage(tmp_path):
    """Pillow checks no IDAT chunk's CRC (libpng does): bytes zeroed inside one decoded without an error, the rows
    from the damage on garbage, on every decode path."""
    y, x = np.mgrid[0:64, 0:96]
    out = io.BytesIO()
    Image.fromarray(np.stack([x * 2, y * 3, x + y], -1).astype(np.uint8)).save(out, format="PNG")
    data = out.getvalue()
    start = data.index(b"IDAT")
    at = start + 4 + int.from_bytes(data[start - 4:start], "big") // 2
    path = tmp_path / "rotted.png"
    path.write_bytes(data[:at] + bytes(16) + data[at + 16:])
    with pytest.raises(ValueError, match=r"rotted\.png: a damaged PNG file \(its IDAT chunk at byte 33 fails its CRC"):
        load_image(path)
    with pytest.raises(ValueError, match="CRC"):
        open_pil(path.read_bytes(), "photo.png")
    assert decode_bytes(data, "photo.png").shape == (3, 64, 96)  # the file as written: every CRC matches


def _jpeg(grey_corner: bool = False) -> bytes:
    """A 96x128 JPEG of noise (its image data most of the file); ``grey_corner``: its last 16x16 block mid-grey."""
    pixels = (np.random.RandomState(3).rand(96, 128, 3) * 255).astype(np.uint8)
    if grey_corner:
        pixels[-16:, -16:] = 128
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def test_a_jpeg_cut_short_then_closed_is_refused_by_every_decode_path_not_decoded_grey(tmp_path):
    """A partial download closed by an EOI marker: libjpeg fills the blocks past the cut grey without an error,
    saying so on stderr only, without the file's name; Pillow, silently. Refused, it is skipped and named."""
    data = _jpeg()
    (tmp_path / "c").mkdir()
    cut = tmp_path / "c" / "cut.jpg"
    cut.write_bytes(data[:len(data) // 2] + b"\xff\xd9")
    (tmp_path / "c" / "whole.jpg").write_bytes(data)
    words = r"cut\.jpg: its JPEG image data ends before its last rows \(the file was cut short"
    with pytest.raises(ValueError, match=words):
        load_image(cut)
    with pytest.raises(ValueError, match=words):  # eval's --decode draft
        load_image_reduced(cut, 16)
    with open_pil(cut.read_bytes(), str(cut)) as img, pytest.raises(ValueError, match=words):
        decode_box_reduced(img, (0, 0, 96, 128), 16, str(cut))  # the training crops' --decode draft and windows
    to_tensor = lambda img: torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    batches = list(DataLoader(LabelledImageFolder(tmp_path, to_tensor), batch_size=2, collate_fn=collate_labelled))
    assert [p for b in batches for p in b.bad] == [str(cut)] and sum(len(b[1]) for b in batches) == 1


def test_a_file_cut_short_found_by_a_reduced_decode_is_named_by_its_file(tmp_path):
    """pretrain's --decode draft decodes a crop at a reduced scale from the file's bytes: a JPEG found cut short there
    is an unreadable item of its file, with the cut's reason, as every other decode path gives it (a PNG under
    --decode windows: test_a_png_cut_short_with_exif_before_its_pixels_is_named_by_its_file_under_decode_windows)."""
    from lomar.data.fast_decode import FastPretrainDataset
    from lomar.data.jpeg_cut import cut_error

    data = _jpeg()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[:len(data) // 2] + b"\xff\xd9")
    item = FastPretrainDataset(build_pretrain_dataset(str(tmp_path), 16, scale=(1.0, 1.0)), "draft")[(0, 0)]
    assert item["image"] is None and item["path"] == str(cut) and item["why"] == cut_error(str(cut)).reason


def test_a_whole_jpeg_with_a_mid_grey_corner_decodes_on_every_path(tmp_path):
    """A grey corner makes a JPEG suspect (a cut file's fill): a whole one passes the check of its data."""
    data = _jpeg(grey_corner=True)
    image = decode_bytes(data, "grey.jpg")
    assert image.shape == (3, 96, 128) and image[:, -1, -1].tolist() == [128, 128, 128]
    (tmp_path / "grey.jpg").write_bytes(data)
    assert load_image_reduced(tmp_path / "grey.jpg", 16)[:, -1, -1].tolist() == [128, 128, 128]
    with open_pil(data, "grey.jpg") as img:
        reduced, _ = decode_box_reduced(img, (0, 0, 96, 128), 16, "grey.jpg")
    assert reduced.size == (32, 24) and reduced.getpixel((31, 23)) == (128, 128, 128)


def test_a_pngs_crc_walk_runs_once_a_decode_and_copies_no_chunk(monkeypatch):
    """The walk reads the whole file (25 ms on a 36 MB PNG), so a decode walks it once, not again in its Pillow open;
    and it slices no chunk into a copy (a one-IDAT 36 MB PNG would be 36 MB more per read)."""
    import tracemalloc

    import lomar.data.decode as decode
    from lomar.data.headers import png_bad_chunk

    walks = []
    monkeypatch.setattr(decode, "png_bad_chunk", lambda data: walks.append(len(data)) or png_bad_chunk(data))
    assert decode_bytes(_png_header(8, 1), "t.png").shape == (3, 1, 8) and len(walks) == 1
    one_idat = _png_header(8, 1)[:33] + png_chunk(b"IDAT", bytes(4 << 20)) + png_chunk(b"IEND", b"")
    tracemalloc.start()
    try:
        assert png_bad_chunk(one_idat) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_16_bit_images_scale_by_their_depth_not_their_brightest_pixel():
    def grey(value: int) -> int:
        out = io.BytesIO()
        Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(out, format="PNG")
        return int(decode_bytes(out.getvalue(), "t.png")[0, 0, 0])

    assert [grey(v) for v in (200, 256, 32768, 65535)] == [0, 0, 127, 255]  # value * 255 / 65535, truncated
