"""Reliability of the data layer: pixel limit, clear decode errors, symlinks, labelled folders, shards."""

import io
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from crafted import png_chunk
from lomar.data.collate import collate_labelled, collate_labelled_refill
from lomar.data.decode import (
    decode_box_reduced,
    decode_bytes,
    load_image,
    load_image_reduced,
    max_image_pixels,
    open_pil,
    oriented_size,
)
from lomar.data.folder import LabelledImageFolder, build_image_list, build_pretrain_dataset
from lomar.data.image_search import find_images
from lomar.data.shards import TarShardDataset
from lomar.data.transforms import PretrainTransform


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a few bytes): a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _png(path, size=(20, 30), seed=0):
    Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)).save(path)
    return path


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


@pytest.mark.skipif(not hasattr(__import__("os"), "symlink"), reason="needs symlinks")
def test_symlinked_folders_are_followed_once_and_dangling_links_kept(tmp_path, caplog):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    elsewhere.mkdir()
    _png(root / "a" / "one.png")
    _png(elsewhere / "two.png")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # back to an ancestor
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        found = find_images(root)
    names = [p.relative_to(root).as_posix() for p in found]
    assert names == ["a/one.png", "gone.png", "linked/two.png"]
    assert "loop" in caplog.text
    assert list(build_image_list(root)) == found
    with pytest.raises(ValueError, match=r"cannot read .*gone.png: it is a link to .*missing.png, which does not "
                                         r"exist; fix or remove the link$"):
        load_image(root / "gone.png")
    with pytest.raises(ValueError, match=r"cannot read .*absent.png: No such file or directory$"):
        load_image(root / "absent.png")
    (root / "chain.png").symlink_to("gone.png")  # a link to that link: gone.png exists, missing.png does not
    with pytest.raises(ValueError, match=r"cannot read .*chain.png: it is a link to gone.png, which links on to "
                                         r".*/missing.png, which does not exist; fix or remove the link$"):
        load_image(root / "chain.png")


@pytest.mark.skipif(not hasattr(__import__("os"), "symlink"), reason="needs symlinks")
def test_a_link_to_an_image_listed_already_is_used_once(tmp_path, caplog):
    """A folder of links into another searched folder (a curated subset) gave each such image twice an epoch."""
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for folder in (root / "all", root / "subset", elsewhere):
        folder.mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        (root / "all" / f"{name}.jpg").write_bytes(b"x")
    (elsewhere / "e.jpg").write_bytes(b"x")
    (root / "subset" / "a.jpg").symlink_to("../all/a.jpg")
    (root / "subset" / "b.jpg").symlink_to(root / "all" / "b.jpg")
    (root / "a_first.jpg").symlink_to("all/c.jpg")  # sorted before all/c.jpg: the file's own path is the one kept
    (root / "subset" / "chain.jpg").symlink_to(tmp_path / "hop.jpg")  # a link to a link outside, to all/d.jpg
    (tmp_path / "hop.jpg").symlink_to(root / "all" / "d.jpg")
    (root / "subset" / "gone.jpg").symlink_to("../all/missing.jpg")  # dangling: kept, as any
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    for name in ("x.jpg", "y.jpg"):
        (root / "subset" / name).symlink_to(elsewhere / "e.jpg")  # listed as linked/e.jpg too
    (root / "subset" / "z.jpg").symlink_to(tmp_path / "outside.jpg")
    (root / "subset" / "zz.jpg").symlink_to(tmp_path / "outside.jpg")
    (tmp_path / "outside.jpg").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        found = find_images(root)
        classes = LabelledImageFolder(root)  # each class searched alone: its links into another class are its own
    assert [p.relative_to(root).as_posix() for p in found] == [
        "all/a.jpg", "all/b.jpg", "all/c.jpg", "all/d.jpg", "linked/e.jpg", "subset/gone.jpg", "subset/z.jpg"]
    assert [Path(p).relative_to(root).as_posix() for p in classes.paths] == [
        "all/a.jpg", "all/b.jpg", "all/c.jpg", "all/d.jpg", "linked/e.jpg", "subset/a.jpg", "subset/b.jpg",
        "subset/chain.jpg", "subset/gone.jpg", "subset/x.jpg", "subset/z.jpg"]
    assert [r.getMessage() for r in caplog.records][:2] == [
        f"{root}: 7 symlink(s) lead to an image already listed (e.g. {root / 'a_first.jpg'} and "
        f"{root / 'all' / 'c.jpg'} are one file); used once",
        f"{root}: 2 symlink(s) lead to an image already listed (e.g. {root / 'subset' / 'y.jpg'} and "
        f"{root / 'subset' / 'x.jpg'} are one file); used once"]


@pytest.mark.skipif(not hasattr(__import__("os"), "symlink"), reason="needs symlinks")
def test_a_class_folder_linking_back_to_the_root_does_not_take_the_other_classes_images(tmp_path, caplog):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        _png(tmp_path / label / "0.png")
    (tmp_path / "cat" / "up").symlink_to(tmp_path, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        dataset = LabelledImageFolder(tmp_path)
    assert [(Path(p).relative_to(tmp_path).as_posix(), y) for p, y in dataset.samples] == [("cat/0.png", 0),
                                                                                          ("dog/0.png", 1)]
    assert "loop" in caplog.text


def test_a_hidden_folder_is_no_class(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        _png(tmp_path / label / "0.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # Jupyter makes one wherever a notebook is opened
    dataset = LabelledImageFolder(tmp_path)
    assert dataset.classes == ["cat", "dog"] and dataset.targets == [0, 1]


def test_splits_with_other_class_folders_are_refused_naming_the_odd_ones(tmp_path):
    for split, labels in (("train", ("cat", "dog", "owl")), ("val", ("cat", "dog", "yak"))):
        for label in labels:
            (tmp_path / split / label).mkdir(parents=True)
            _png(tmp_path / split / label / "0.png")
    train, val = LabelledImageFolder(tmp_path / "train"), LabelledImageFolder(tmp_path / "val")
    with pytest.raises(ValueError, match=rf"only in {tmp_path / 'train'}: \['owl'\], only in {tmp_path / 'val'}: "
                                         rf"\['yak'\]; give both splits the same class folders"):
        train.check_same_classes(val)
    train.check_same_classes(train)


def test_labelled_folder_skips_and_reports_unreadable_images(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            _png(tmp_path / label / f"{i}.png", seed=i)
    (tmp_path / "dog" / "broken.png").write_bytes(b"garbage")
    to_tensor = lambda img: torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    dataset = LabelledImageFolder(tmp_path, to_tensor)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 7
    batches = list(DataLoader(dataset, batch_size=4, collate_fn=collate_labelled))
    assert sum(len(b[1]) for b in batches) == 6
    assert [p for b in batches for p in b.bad] == [str(tmp_path / "dog" / "broken.png")]
    images, targets = next(iter(DataLoader(dataset, batch_size=7, collate_fn=collate_labelled_refill)))
    assert images.shape[0] == targets.shape[0] == 7  # a training batch keeps its size (mixup pairs)


def test_labelled_batches_keep_their_bad_list_through_workers(tmp_path):
    (tmp_path / "only").mkdir()
    _png(tmp_path / "only" / "good.png")
    (tmp_path / "only" / "bad.png").write_bytes(b"x")
    loader = DataLoader(LabelledImageFolder(tmp_path, lambda img: torch.zeros(1)), batch_size=2, num_workers=1,
                        collate_fn=collate_labelled)
    (batch,) = list(loader)
    assert batch.bad == [str(tmp_path / "only" / "bad.png")] and batch[1].tolist() == [0]


@pytest.mark.parametrize("make, words", [
    (lambda root: None, "root does not exist: expected a folder of class folders"),
    (lambda root: root.write_bytes(b"x"), "root is not a folder: expected a folder of class folders"),
    (lambda root: root.mkdir(), "holds no class folders"),
    (lambda root: (root / "empty").mkdir(parents=True), "no images found in the class folders"),
])
def test_labelled_folder_bad_roots(tmp_path, make, words):
    make(tmp_path / "root")
    with pytest.raises(ValueError, match=words):
        LabelledImageFolder(tmp_path / "root")


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_missing_split_is_named_as_its_data_folders_lack(tmp_path, split):
    # knn / linprobe given a folder of images (or of class folders) as --data: the split it lacks, not "DATA/train
    # is not a folder of class folders", a path the user never wrote
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"photos holds no {split}/ folder: expected the split's class folders"):
        LabelledImageFolder(tmp_path / "photos" / split)


def test_a_damaged_shard_is_reported_once_and_counted(tmp_path, caplog):
    good = tmp_path / "a.tar"
    with tarfile.open(good, "w") as archive:
        archive.add(_png(tmp_path / "x.png"), arcname="x.png")
    (tmp_path / "b.tar").write_bytes(b"not a tar file" * 100)
    dataset = TarShardDataset([good, tmp_path / "b.tar"], PretrainTransform(16), shuffle_buffer=1)
    with caplog.at_level(logging.DEBUG, logger="lomar.data"):
        assert dataset.count_samples() == 1
        items = list(dataset) + list(dataset)
    assert len(items) == 2 and list(dataset.damaged) == [str(tmp_path / "b.tar")]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "b.tar" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()  # tarfile's reason lists each compression it tried, a line each


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
    with open_pil(data) as img:
        assert oriented_size(img) == (40, 24)
        upright = torch.from_numpy(np.asarray(ImageOps.exif_transpose(img).convert("RGB"))).permute(2, 0, 1)
    image = decode_bytes(data)
    assert image.shape == (3, 40, 24)
    if fmt != "JPEG":  # lossless: Pillow's rotation of the same pixels
        assert torch.equal(image, upright)


@pytest.mark.parametrize("keeps_tag", [False, True])
def test_a_tiff_is_turned_once_by_its_orientation_tag(monkeypatch, keeps_tag):
    """Pillow turns a TIFF upright as it loads it. Pillow 9.1-10.0 kept the tag after turning it, so an exif_transpose
    after the load turned it again (6 and 8 upside down, 5 and 7 as stored): decode_bytes leaves the turn to Pillow
    whether or not the tag is left (keeps_tag: as those Pillows did, which this project no longer takes)."""
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
        assert np.array_equal(decode_bytes(out.getvalue()).permute(1, 2, 0).numpy(), want), orientation


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
    with open_pil((tmp_path / "broken.png").read_bytes()) as img, pytest.raises(OSError):
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
        open_pil(path.read_bytes())
    assert decode_bytes(data).shape == (3, 64, 96)  # the file as written: every CRC matches


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
    with open_pil(cut.read_bytes()) as img, pytest.raises(ValueError, match="ends before its last rows"):
        decode_box_reduced(img, (0, 0, 96, 128), 16)  # the training crops' --decode draft and windows
    to_tensor = lambda img: torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    batches = list(DataLoader(LabelledImageFolder(tmp_path, to_tensor), batch_size=2, collate_fn=collate_labelled))
    assert [p for b in batches for p in b.bad] == [str(cut)] and sum(len(b[1]) for b in batches) == 1


def test_a_whole_jpeg_with_a_mid_grey_corner_decodes_on_every_path(tmp_path):
    """A grey corner makes a JPEG suspect (a cut file's fill): a whole one passes the check of its data."""
    data = _jpeg(grey_corner=True)
    image = decode_bytes(data, "grey.jpg")
    assert image.shape == (3, 96, 128) and image[:, -1, -1].tolist() == [128, 128, 128]
    (tmp_path / "grey.jpg").write_bytes(data)
    assert load_image_reduced(tmp_path / "grey.jpg", 16)[:, -1, -1].tolist() == [128, 128, 128]
    with open_pil(data) as img:
        reduced, _ = decode_box_reduced(img, (0, 0, 96, 128), 16)
    assert reduced.size == (32, 24) and reduced.getpixel((31, 23)) == (128, 128, 128)


def test_a_pngs_crc_walk_runs_once_a_decode_and_copies_no_chunk(monkeypatch):
    """The walk reads the whole file (25 ms on a 36 MB PNG): decode_bytes checked it, then its Pillow open again;
    and each chunk's slice was a copy (a one-IDAT 36 MB PNG: 36 MB more per read)."""
    import tracemalloc

    import lomar.data.decode as decode
    from lomar.data.headers import png_bad_chunk

    walks = []
    monkeypatch.setattr(decode, "png_bad_chunk", lambda data: walks.append(len(data)) or png_bad_chunk(data))
    assert decode_bytes(_png_header(8, 1)).shape == (3, 1, 8) and len(walks) == 1
    one_idat = _png_header(8, 1)[:33] + png_chunk(b"IDAT", bytes(4 << 20)) + png_chunk(b"IEND", b"")
    tracemalloc.start()
    try:
        assert png_bad_chunk(one_idat) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_pngs_exif_before_its_pixels_is_read_without_decoding_them_and_a_malformed_one_is_ignored():
    """An eXIf chunk before IDAT is read at open (Pillow decodes the pixels only to look for one after them): a size
    read from the header stays a header read (200 ms on a 12 MP PNG). A malformed EXIF block is no orientation."""
    out, exif = io.BytesIO(), Image.Exif()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(out, format="PNG")
    data, exif[0x0112] = out.getvalue(), 6
    with open_pil(data[:33] + png_chunk(b"eXIf", exif.tobytes()) + data[33:]) as img:
        assert oriented_size(img) == (6, 4) and img.tile  # turned, and not decoded
    iend = data.rindex(b"IEND") - 4
    for broken in (data[:33] + png_chunk(b"eXIf", b"MM\x00*junk") + data[33:],
                   data[:iend] + png_chunk(b"eXIf", b"MM\x00*junk") + data[iend:]):
        with open_pil(broken) as img:
            assert oriented_size(img) == (4, 6)
        assert decode_bytes(broken).shape == (3, 4, 6)


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
            image = decode_bytes(data)
            best[orientation] = min(best[orientation], time.perf_counter() - start)
    assert image.shape == (3, 2800, 2100)
    assert best[6] < 3 * best[1], f"sideways {best[6] * 1e3:.0f} ms, upright {best[1] * 1e3:.0f} ms"


def test_16_bit_images_scale_by_their_depth_not_their_brightest_pixel():
    def grey(value: int) -> int:
        out = io.BytesIO()
        Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(out, format="PNG")
        return int(decode_bytes(out.getvalue())[0, 0, 0])

    assert [grey(v) for v in (200, 256, 32768, 65535)] == [0, 0, 127, 255]  # value * 255 / 65535, truncated


def test_a_shard_member_over_the_byte_limit_is_skipped_unread(tmp_path, monkeypatch):
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as archive:
        archive.add(_png(tmp_path / "big.png", size=(64, 64)), arcname="big.png")
        archive.add(_png(tmp_path / "small.png", size=(4, 4)), arcname="small.png")
    limit = (tmp_path / "big.png").stat().st_size - 1
    assert (tmp_path / "small.png").stat().st_size <= limit
    monkeypatch.setenv("LOMAR_MAX_IMAGE_BYTES", str(limit))
    read = []
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m, _real=tarfile.TarFile.extractfile:
                        read.append(m.name) or _real(self, m))
    items = {Path(item["path"]).name.split(":")[-1]: item for item in TarShardDataset([shard], PretrainTransform(16),
                                                                                         shuffle_buffer=1)}
    assert items["big.png"]["image"] is None and items["small.png"]["image"] is not None
    assert read == ["small.png"]


def test_brace_patterns_are_counted_before_they_are_expanded(tmp_path):
    from lomar.data.shards import shard_paths

    for name in ("s-00.tar", "s-01.tar", "s-02.tar"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in shard_paths(str(tmp_path / "s-{00..02}.tar"))] == ["s-00.tar", "s-01.tar", "s-02.tar"]
    with pytest.raises(ValueError, match=r"names 1,000,000,000 shards, over the 1,000,000 lomar reads"):
        shard_paths(str(tmp_path / "s-{000000000..999999999}.tar"))  # refused at once, not made
    with pytest.raises(ValueError, match=r"names 2,000,000 shards"):
        shard_paths(str(tmp_path / "s-{0..1999}-{0..999}.tar"))
    with pytest.raises(ValueError, match=r"names 2 shard\(s\) that do not exist, e.g. .*s-03.tar; fix the brace range"):
        shard_paths(str(tmp_path / "s-{00..04}.tar"))  # named one by one: a missing one is no smaller data set
    assert len(shard_paths(str(tmp_path / "s-{00..04}*.tar"))) == 3  # a wildcard may match nothing
    for bad in ("s-{00..0x}.tar", "s-{00..02.tar"):
        with pytest.raises(ValueError, match=r"each brace must close and hold a range of whole numbers"):
            shard_paths(str(tmp_path / bad))
