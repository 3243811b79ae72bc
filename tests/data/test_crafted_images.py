"""Crafted and hostile image inputs: every decode path refuses a header over the pixel limit
before any decoder allocates (whichever decoder's reading of the header it is), and never
opens what is not a regular file; each ends as one skipped, counted image or one line."""

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from crafted import HUGE, bombs, fifo, gif, grey_png, jpeg, link, png, sparse, webp_canvas, webp_lossless
from lomar.data.collate import collate_pretrain
from lomar.data.decode import decode_bytes, load_image, read_image_bytes
from lomar.data.device_decode import EncodedPretrainDataset, collate_encoded, decode_batch
from lomar.data.fast_decode import FastPretrainDataset
from lomar.data.folder import ImageListDataset, build_image_list, build_pretrain_dataset
from lomar.data.headers import declared_size, jpeg_frame_size, png_size, webp_size
from lomar.data.segmentation import read_labels
from lomar.data.transforms import PretrainTransform
from lomar.limits import DEFAULT_MAX_IMAGE_PIXELS
from lomar.methods import get_method

SRC = Path(__file__).resolve().parents[2] / "src"
TESTS = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a blocking open() of a FIFO is interrupted by the alarm."""
    def expire(*_):
        raise TimeoutError(f"still blocked after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def decoders(monkeypatch):
    """Every decoder call, recorded: ("torchvision", input bytes) or ("pillow", (w, h) allocated)."""
    import torchvision.io

    calls = []
    for name in ("decode_jpeg", "decode_webp", "decode_png", "decode_gif", "decode_image"):
        real = getattr(torchvision.io, name)

        def spy(data, *args, _real=real, **kwargs):
            calls.append(("torchvision", bytes(data.numpy()) if isinstance(data, torch.Tensor)
                          else [bytes(d.numpy()) for d in data]))
            return _real(data, *args, **kwargs)
        monkeypatch.setattr(torchvision.io, name, spy)
    real_load = ImageFile.ImageFile.load

    def load(self):
        calls.append(("pillow", self.size))
        return real_load(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def _never_decoded(calls, crafted: set[bytes]) -> None:
    for kind, what in calls:
        if kind == "pillow":
            assert what[0] * what[1] <= DEFAULT_MAX_IMAGE_PIXELS, f"Pillow decoded {what[0]}x{what[1]}"
        else:
            assert not crafted & set(what if isinstance(what, list) else [what]), "torchvision got a crafted file"


# Two frame headers: libjpeg refuses the file whichever comes first, so it is refused as malformed.
REFUSED = {"first-huge.jpg": "exactly one frame header", "last-huge.jpg": "exactly one frame header"}


@pytest.mark.parametrize("name", sorted(bombs()))
def test_crafted_header_is_refused_in_one_line_before_any_decoder(name, decoders):
    data = bombs()[name]
    with pytest.raises(ValueError, match=REFUSED.get(name, "over the limit of 178,956,970")) as info:
        decode_bytes(data, name)
    assert "\n" not in str(info.value) and name in str(info.value)
    assert decoders == []


@pytest.mark.parametrize("name, data, expected", [
    ("blind.jpg", jpeg(40, 30, pillow_blind=True), (40, 30)),  # the header Pillow cannot read, libjpeg can
    ("two.jpg", jpeg(40, 30, then=(16, 16)), None),  # libjpeg refuses a second frame header
    ("fill.jpg", b"\xff\xd8\x00junk\xff\xff\xff\x00\xff\xd0\xff\xe0\x00\x04ab" + jpeg(40, 30)[2:], (40, 30)),
    ("scan-first.jpg", b"\xff\xd8\xff\xda\x00\x02" + jpeg(40, 30)[2:], None),  # a scan before any frame header
    ("short-length.jpg", b"\xff\xd8\xff\xe1\x00\x00" + jpeg(40, 30)[2:], (40, 30)),  # length < 2 skips nothing
    ("cut.jpg", jpeg(40, 30)[:60], None),
])
def test_jpeg_frame_size_reads_markers_as_libjpeg_does(name, data, expected):
    assert jpeg_frame_size(data) == expected


def test_header_sizes_agree_with_the_decoders_on_real_files():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    variants = [("JPEG", {}), ("JPEG", {"progressive": True}), ("JPEG", {"exif": exif}), ("JPEG", {"subsampling": 0}),
                ("JPEG", {"icc_profile": bytes(70_000)}), ("PNG", {}), ("WEBP", {"lossless": True}),
                ("WEBP", {"quality": 80})]
    for fmt, options in variants:
        buf = io.BytesIO()
        photo.save(buf, fmt, **options)
        assert declared_size(buf.getvalue()) == (fmt.lower(), (53, 37)), (fmt, options)
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        photo.convert(mode).save(buf, "JPEG")
        assert jpeg_frame_size(buf.getvalue()) == (53, 37)
    # Exact sizes from hand-written headers: 14-bit VP8L, 24-bit VP8X canvas, 32-bit PNG.
    assert webp_size(webp_lossless(16383, 5)) == (16383, 5) and webp_size(webp_canvas(HUGE, 7)) == (HUGE, 7)
    assert png_size(png(HUGE, 3, rows=1)) == (HUGE, 3)
    assert declared_size(gif(5, 5)) == ("gif", None)  # GIF goes to Pillow, whose own header is checked


def test_crafted_small_images_still_decode():
    # libjpeg fills what is missing
    assert decode_bytes(jpeg(40, 30, pillow_blind=True), "blind.jpg").shape == (3, 30, 40)
    assert decode_bytes(gif(4, 3), "t.gif").shape == (3, 3, 4)
    with pytest.raises(ValueError, match="two.jpg: a JPEG without exactly one frame header"):
        decode_bytes(jpeg(40, 30, then=(16, 16)), "two.jpg")


def test_png_shorter_than_its_header_decodes_or_is_refused_without_a_crash(tmp_path):
    # libpng through torchvision dies with SIGSEGV on it: in a subprocess, so that would fail, not crash the run.
    path = tmp_path / "short.png"
    path.write_bytes(png(64, 48, rows=10))
    code = (f"from lomar.data.decode import load_image\ntry:\n    print(tuple(load_image({str(path)!r}).shape))\n"
            f"except ValueError as e:\n    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout == "(3, 48, 64)\n" or done.stdout.startswith(f"refused: cannot decode image {path}: "), \
        done.stdout


def test_only_regular_files_are_read(tmp_path, monkeypatch):
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    cases = {"pipe.jpg": ("a named pipe", fifo(tmp_path / "pipe.jpg")),
             "zero.jpg": ("a character device", link(tmp_path / "zero.jpg", "/dev/zero")),
             "random.png": ("a character device", link(tmp_path / "random.png", "/dev/urandom")),
             "folder.jpg": ("a folder", tmp_path / "folder.jpg"),
             "huge.jpg": ("314,572,800 bytes is over the limit of 268,435,456",
                          sparse(tmp_path / "huge.jpg", 300 << 20))}
    (tmp_path / "folder.jpg").mkdir()
    with deadline(30):
        for why, path in cases.values():
            with pytest.raises(ValueError, match=why) as info:
                read_image_bytes(path)
            assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert opened == []  # refused on stat: not even opened
    (tmp_path / "ok.jpg").write_bytes(b"0123456789")
    monkeypatch.setenv("LOMAR_MAX_IMAGE_BYTES", "9")
    with pytest.raises(ValueError, match="10 bytes is over the limit of 9 for one image; .* LOMAR_MAX_IMAGE_BYTES"):
        read_image_bytes(tmp_path / "ok.jpg")
    monkeypatch.setenv("LOMAR_MAX_IMAGE_BYTES", "10")
    assert read_image_bytes(tmp_path / "ok.jpg") == b"0123456789"


def test_data_path_that_is_not_a_file_or_folder_is_one_line(tmp_path):
    pipe = fifo(tmp_path / "list.txt")
    with deadline(30):
        for path in (pipe, Path("/dev/zero")):
            with pytest.raises(ValueError, match="neither a folder nor a regular file"):
                build_image_list(path)


def _hostile_folder(root: Path) -> tuple[Path, set[str]]:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 255, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"ok{i}.jpg")
    for name, data in bombs().items():
        (root / name).write_bytes(data)
    fifo(root / "pipe.jpg")
    link(root / "zero.jpg", "/dev/zero")
    link(root / "random.png", "/dev/urandom")
    sparse(root / "huge.jpg", 300 << 20)
    return root, {*bombs(), "pipe.jpg", "zero.jpg", "random.png", "huge.jpg"}


class _Cfg:  # the settings the LoMaR masker reads
    window_size, windows, mask_ratio = 2, 2, 0.75


@pytest.mark.parametrize("mode", ["full", "draft", "windows", "gpu"])
def test_every_decode_mode_skips_and_counts_each_hostile_file(tmp_path, mode, decoders):
    root, hostile = _hostile_folder(tmp_path)
    masker = get_method("lomar").masker(_Cfg(), (4, 4))
    base = build_pretrain_dataset(str(root), 32, seed=1, masker=masker)
    keys = [(i, 0) for i in range(len(base))]
    with deadline(60):
        if mode == "gpu":  # the worker half, then the batch decode (on the CPU here: the same code)
            dataset = EncodedPretrainDataset(base)
            batch = decode_batch(collate_encoded([dataset[k] for k in keys]), torch.device("cpu"), base.transform)
        else:
            dataset = base if mode == "full" else FastPretrainDataset(base, mode, patch_size=8, window_size=2,
                                                                      num_windows=2)
            batch = collate_pretrain([dataset[k] for k in keys])
    assert {Path(p).name for p in batch["bad"]} == hostile
    assert batch["images"].shape == (6, 3, 32, 32)
    _never_decoded(decoders, set(bombs().values()))


def test_a_list_naming_devices_reads_none_of_them(tmp_path):
    good = tmp_path / "ok.jpg"
    Image.new("RGB", (40, 30), "red").save(good)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{good}\n/dev/zero\n/dev/urandom\n{fifo(tmp_path / 'pipe.png')}\n")
    dataset = build_pretrain_dataset(str(listing), 16)
    with deadline(30):
        items = [dataset[(i, 0)] for i in range(len(dataset))]
    assert [item["image"] is None for item in items] == [False, True, True, True]
    with pytest.raises(ValueError, match="character device"):
        load_image("/dev/zero")


_CAPPED = textwrap.dedent("""
    import re, resource, sys
    import torch, torchvision  # mapped before the cap: the cap bounds what the command allocates
    mapped = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read())[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (3 << 29), mapped + (3 << 29)))  # 1.5 GiB more
    from lomar.cli.app import main
    code = main(sys.argv[1:])
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"peak resident KiB {peak} (self {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})", file=sys.stderr)
    sys.exit(code)
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "draft", "windows"])
def test_pretrain_on_hostile_files_skips_them_under_a_memory_cap(tmp_path, mode):
    """Through the command line, every hostile file at once among 147 good ones (under the 10 %
    that stops a run): the run finishes and counts each, within 1.5 GiB more than torch maps,
    its resident peak printed."""
    root, hostile = _hostile_folder(tmp_path / "data")
    for i in range(160 - 6 - len(hostile)):  # 160 files: 5 whole batches of 32, each file seen once
        Image.new("RGB", (40, 48), (i, 255 - i, 7 * i % 256)).save(root / f"plain{i:03d}.jpg")
    tiny = ["--model", "vit_tiny_patch8", "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--img-size", "32",
            "--window-size", "2", "--windows", "2", "--batch-size", "32", "--workers", "1", "--threads", "1",
            "--device", "cpu", "--precision", "fp32", "--log-every", "100", "--max-steps", "5"]
    done = subprocess.run([sys.executable, "-c", _CAPPED, "pretrain", *tiny, "--decode", mode, "--data", str(root),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(hostile)} unusable image(s) skipped" in done.stdout, done.stdout[-2000:]
    assert "Traceback" not in done.stderr and "DecompressionBomb" not in done.stderr
    # The address-space cap above is the bound: decoding any of these files would need more. The
    # resident peak (~0.8 GiB alone) is printed, not asserted: inside the full suite the same command
    # peaks at ~1.6 GiB for reasons outside it (not yet understood), so it would test the environment.
    assert re.search(r"peak resident KiB (\d+)", done.stderr), done.stderr[-300:]


def _short_grey_png(width: int, height: int, rows: int) -> bytes:
    """A greyscale PNG whose IHDR declares ``height`` rows and whose complete zlib stream holds ``rows`` of value 3."""
    return grey_png(width, height, (b"\x00" + bytes([3]) * width) * rows)


class _OneWindow:  # one 2x2 window of 8 px patches on a 32 px crop: --decode windows resamples it alone
    window_size, windows, mask_ratio = 2, 1, 0.75


def test_a_png_whose_pixel_data_ends_rows_early_is_refused_not_filled_black(tmp_path):
    # Pillow decodes it without an error, the missing rows zero: a photo half black, a mask half class 0
    short, whole = tmp_path / "short.png", tmp_path / "whole.png"
    short.write_bytes(_short_grey_png(64, 48, rows=10))
    whole.write_bytes(_short_grey_png(64, 48, rows=48))  # every row, the last one 3: decoded as before
    with pytest.raises(ValueError, match=r"short\.png: its PNG pixel data ends before the last rows"):
        load_image(short)
    with pytest.raises(ValueError, match=r"annotation .*short\.png cannot be read \(its pixel data ends"):
        read_labels(short)
    masker = get_method("lomar").masker(_OneWindow(), (4, 4))
    base = ImageListDataset([short, whole], PretrainTransform(32), masker=masker)
    windows = FastPretrainDataset(base, "windows", patch_size=8, window_size=2, num_windows=1)
    assert windows[0]["image"] is None and "ends before the last rows" in windows[0]["why"]
    assert windows[1]["image"] is not None
    assert load_image(whole).eq(3).all() and read_labels(whole).shape == (48, 64)


def test_a_png_cut_short_with_exif_before_its_pixels_is_named_by_its_file_under_decode_windows(tmp_path):
    """An eXIf chunk before the pixels is read at open, so the crop's reduced decode is the first to load them: the
    cut is found there: an unreadable item of the file, with the cut's reason, as load_image refuses it."""
    from crafted import png_chunk

    data = _short_grey_png(64, 48, rows=10)
    short = tmp_path / "short.png"
    short.write_bytes(data[:33] + png_chunk(b"eXIf", b"MM\x00*\x00\x00\x00\x08\x00\x00") + data[33:])
    masker = get_method("lomar").masker(_OneWindow(), (4, 4))
    base = ImageListDataset([short], PretrainTransform(32), masker=masker)
    item = FastPretrainDataset(base, "windows", patch_size=8, window_size=2, num_windows=1)[0]
    assert item["image"] is None
    assert item["path"] == str(short) and item["why"].startswith("its PNG pixel data ends before the last rows")


def test_an_interlaced_png_cut_in_its_last_pass_is_refused_though_its_last_row_is_whole():
    # 4x5, Adam7: passes 1-6 fill the even rows, the last one whole; pass 7 (rows 1 and 3) never comes, left zero
    def rows(count: int, pixels: int) -> bytes:
        return (b"\x00" + bytes([3]) * pixels) * count
    first_six = rows(1, 1) + rows(1, 1) + rows(2, 1) + rows(1, 2) + rows(3, 2)  # pass 2 is empty at this width
    assert decode_bytes(grey_png(4, 5, first_six + rows(2, 4), interlace=1), "whole.png").eq(3).all()
    with pytest.raises(ValueError, match=r"its PNG pixel data ends before the last rows"):
        decode_bytes(grey_png(4, 5, first_six, interlace=1), "cut.png")


def test_a_png_whose_second_ihdr_declares_more_rows_than_its_data_holds_is_refused():
    # Pillow takes the last IHDR before the pixels (8x40 here, 36 rows of it left zero); the first holds 8x4
    four = grey_png(8, 4, (b"\x00" + bytes([3]) * 8) * 4)
    data = four[:33] + grey_png(8, 40, b"")[8:33] + four[33:]  # the IHDR chunk is bytes 8..33
    with pytest.raises(ValueError, match=r"two\.png: its PNG pixel data ends before the last rows"):
        decode_bytes(data, "two.png")
