"""Reading image files and decoding them into uint8 RGB tensors, within bounds.

torchvision decodes JPEG and WebP (fast, EXIF-aware); Pillow decodes everything else (PNG, GIF's
first frame, BMP, TIFF) and what torchvision refuses (CMYK, 16-bit, palette oddities). Nothing
is decoded before its width x height, read from the header the way the decoder that will
decode it reads it (:mod:`lomar.data.headers`), is within :func:`max_image_pixels`; and no
path is opened unless it is a regular file of at most :func:`max_image_bytes`. So a small
crafted file cannot expand into gigabytes, and a FIFO or a device named like an image neither
blocks nor streams forever: each is an unreadable image (a ValueError naming it,
:class:`~lomar.data.image_errors.ImageFileError`), skipped and counted by the datasets. So is a JPEG cut short and
then closed, which libjpeg and Pillow would decode with the rest grey (:mod:`lomar.data.jpeg_cut`), a PNG or a TIFF
whose rows end early (:mod:`~lomar.data.png_cut`, ``tiff_cut``).
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lomar.data.headers import declared_size, foreign_format, jpeg_single_scan, png_bad_chunk
from lomar.data.image_errors import READ, ImageFileError
from lomar.data.jpeg_cut import cut_error, cut_short, grey_corner
from lomar.data.pathtable import dangling_link
from lomar.data.png_cut import PNG_CUT, png_cut_error, png_cut_short
from lomar.data.tiff_cut import tiff_cut, tiff_cut_error
from lomar.errors import exception_line
from lomar.limits import env_limit

__all__ = ["WIDE_MODES", "max_image_pixels", "max_image_bytes", "read_image_bytes", "open_pil", "exif_orientation",
           "oriented_size", "decode_bytes", "check_bytes", "load_image", "load_image_reduced", "decode_box_reduced",
           "pil_to_tensor", "tensor_to_pil", "PIL_FORMATS", "JPEG_FORMATS"]

# What Pillow may identify a file as: the formats of image_names.IMAGE_EXTENSIONS (its JPEG opener also gives MPO, a
# JPEG of several pictures). Any other plugin would parse a file whose extension lies, e.g. EPS, which Pillow hands
# to Ghostscript to render.
PIL_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
# Pillow's formats of a JPEG stream: MPO is a JPEG whose first picture is the photo and whose others a camera's
# preview or a phone's HDR gain map; libjpeg decodes (and DCT-scales) its first picture as any JPEG's.
JPEG_FORMATS = ("JPEG", "MPO")
MAX_JPEG_SCANS = 100  # scans (SOS markers) in a JPEG, embedded thumbnails' included
# Pillow modes of more than 8 bits a channel: scaled to 8 bits here, where Pillow's convert would clip.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")


def max_image_pixels() -> int:
    """The largest image decoded: ``LOMAR_MAX_IMAGE_PIXELS`` if set (a positive integer), else the default."""
    return env_limit("LOMAR_MAX_IMAGE_PIXELS")


def max_image_bytes() -> int:
    """The largest image file read: ``LOMAR_MAX_IMAGE_BYTES`` if set (a positive integer), else 256 MiB."""
    return env_limit("LOMAR_MAX_IMAGE_BYTES")


def _check_file(path: str | Path, info: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
        kind = next((text for test, text in kinds if test(info.st_mode)), "not a regular file")
        raise ImageFileError(path, f"it is {kind}, not an image file; remove it from the data", READ)
    if info.st_size > limit:
        raise ImageFileError(path, f"{info.st_size:,} bytes is over the limit of {limit:,} for one image; shrink it "
                                   f"or raise LOMAR_MAX_IMAGE_BYTES", READ)


def read_image_bytes(path: str | Path, max_bytes: int | None = None) -> bytes:
    """The bytes of an image file; ValueError naming it when it is not a regular file (a FIFO
    would block, a device could stream forever), is larger than ``max_bytes`` (default
    :func:`max_image_bytes`) or cannot be read. Checked before opening (opening a device can
    have effects) and again on the open file (it may have been swapped in between)."""
    limit = max_bytes if max_bytes is not None else max_image_bytes()
    try:
        _check_file(path, os.stat(path), limit)
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
        with os.fdopen(os.open(path, flags), "rb") as handle:
            info = os.fstat(handle.fileno())
            _check_file(path, info, limit)
            return handle.read(info.st_size)  # what a growing file held when checked
    except FileNotFoundError as exc:  # a dangling link is listed as an image: `ls` shows it, so say what it is
        if link := dangling_link(path):
            raise ImageFileError(path, f"it is {link}; fix or remove the link", READ) from exc
        raise ImageFileError(path, str(exc.strerror or exc), READ) from exc
    except OSError as exc:
        raise ImageFileError(path, str(exc.strerror or exc), READ) from exc


def _check_pixels(name: str, width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise ImageFileError(name, f"{width}x{height} = {width * height:,} pixels is over the "
                                   f"limit of {limit:,}; shrink it or raise LOMAR_MAX_IMAGE_PIXELS")


def _checked_header(data: bytes, name: str, max_pixels: int | None) -> tuple[str | None, tuple[int, int] | None, int]:
    """(format, size from the header its own decoder reads, pixel limit: ``max_pixels`` or the default), the
    size checked against the limit. A JPEG or WebP without a readable size is refused, as libjpeg / libwebp do."""
    if not data:
        raise ImageFileError(name, "the file is empty (0 bytes)")
    limit = max_pixels if max_pixels is not None else max_image_pixels()
    kind, size = declared_size(data)
    if kind in ("jpeg", "webp") and size is None:
        what = ("a JPEG without exactly one frame header (SOF) before its data" if kind == "jpeg"
                else "a WebP without a size")
        raise ImageFileError(name, f"{what}; the file is damaged or crafted")
    if size is not None:
        _check_pixels(name, *size, limit)
    if kind == "png" and (bad := png_bad_chunk(data)):  # about 1 ms a MB
        raise ImageFileError(name, f"a damaged PNG file (its {bad[0]} chunk at byte {bad[1]:,} fails "
                                   f"its CRC check); replace or remove it")
    # libjpeg decodes every scan over the whole frame: a repeated 31-byte scan cost 10 ms on a 16 MP frame, so a
    # few hundred kB of them stall a worker for minutes. FF DA (a scan's start) cannot occur in entropy-coded data.
    # Counting reads the whole file (about 1 ms a MB): not for a photo libjpeg reads one scan of (most cameras').
    if kind == "jpeg" and not jpeg_single_scan(data) and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        raise ImageFileError(name, f"a JPEG of {scans:,} scans, over the {MAX_JPEG_SCANS} any "
                                   f"encoder writes (progressive ones write about 10); the file is damaged or crafted")
    return kind, size, limit


def open_pil(data: bytes, name: str, max_pixels: int | None = None):
    """``PIL.Image.open`` on checked bytes: ValueError naming ``name`` when unidentified, when a
    header is over the pixel limit (ours or Pillow's), or when Pillow and libjpeg would read a
    JPEG's size differently (every decoder that may decode it must agree)."""
    return _open_checked(data, name, *_checked_header(data, name, max_pixels))


def _open_checked(data: bytes, name: str, kind: str | None, size: tuple[int, int] | None, limit: int):
    """:func:`open_pil` on bytes :func:`_checked_header` passed: one check a decode (a PNG's CRC walk reads it all)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # a damaged EXIF block's notes, read at open: every worker
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError as exc:  # over Pillow's own global limit, which we do not change
        found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(exc))
        pixels, pil_limit = (int(found[1]), int(found[2])) if found else (0, limit)
        raise ImageFileError(name, f"{pixels:,} pixels is over the limit of "
                                   f"{min(limit, pil_limit):,} (Pillow refuses it as a possible decompression bomb); "
                                   f"shrink it") from None
    except Exception:  # UnidentifiedImageError, or whatever a plugin raises on a malformed header
        # Pillow's own message names an anonymous BytesIO: say what the file is instead.
        if kind:  # its signature is one of ours (a WebP cut short fails here, at open): not another format
            raise ImageFileError(name, f"a damaged or truncated {kind.upper()} file ({len(data):,} "
                                       f"bytes); replace or remove it") from None
        foreign = foreign_format(data)
        if foreign:  # its name says JPEG or PNG (a folder search passes over .heic files, with a warning)
            raise ImageFileError(name, f"it is a photo in {foreign}, a format lomar does not read "
                                       f"(JPEG, PNG, GIF, BMP, TIFF, WebP); convert it to JPEG or PNG") from None
        raise ImageFileError(name, f"not an image format lomar reads (JPEG, PNG, GIF, BMP, TIFF, "
                                   f"WebP; {len(data):,} bytes starting {data[:8]!r})") from None
    try:
        if kind == "jpeg" and img.format in JPEG_FORMATS and img.size != size:
            raise ImageFileError(name, f"its JPEG frame headers disagree on the size ({size[0]}x{size[1]} first, "
                                       f"{img.size[0]}x{img.size[1]} last); the file is damaged or crafted")
        _check_pixels(name, *img.size, limit)
        if img.format == "TIFF" and (cut := tiff_cut(data)):  # from its tags: before a pixel is allocated
            raise tiff_cut_error(name, cut)
    except ValueError:
        img.close()
        raise
    return img


def exif_orientation(img: Image.Image) -> int | None:
    """The EXIF orientation tag of an opened image (1: as stored); None when the EXIF block cannot be read.
    Any other than 0 or 1 asks (or may ask) for a rotation/flip, which every decode path applies.

    OSError when the image is a PNG whose pixel data cannot be decoded, or ends rows early (:mod:`lomar.data.png_cut`),
    and no EXIF chunk comes before it: Pillow's PNG reader then decodes the pixels to look for one after them, and
    once that has failed, its next decode returns the rows read before the damage and zeros below them, without an
    error (``--decode windows`` trained on them where ``full`` skipped the file). An EXIF chunk before the pixels is
    read at open: the pixels stay undecoded."""
    if img.format == "PNG" and "exif" not in img.info:  # Pillow's own condition for decoding them in getexif
        source = getattr(img, "fp", None)  # the bytes opened, which Pillow lets go of once it has loaded them
        try:
            img.load()
        except OSError:
            raise
        except Exception as exc:  # SyntaxError, EOFError...: a damaged file, as the datasets' readers catch it
            raise OSError(exception_line(exc)) from exc
        if hasattr(source, "getvalue") and png_cut_short(img, source.getvalue()):
            raise OSError(PNG_CUT)
    try:
        with warnings.catch_warnings():  # a damaged block's 'Tag data larger than file' and such, from every worker
            warnings.simplefilter("ignore", UserWarning)
            return int(img.getexif().get(0x0112, 1))
    except Exception:
        return None


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) of an opened image as :func:`decode_bytes` returns it (EXIF orientation applied),
    from the header."""
    width, height = img.size
    if img.format == "TIFF":
        return height, width  # Pillow (11+) turns a TIFF upright as it loads it and gives that size at open
    return (width, height) if exif_orientation(img) in (5, 6, 7, 8) else (height, width)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as uint8 (3, H, W) RGB (transparency dropped, as torchvision's ImageFolder drops it), channels
    last in memory (a view of an (H, W, 3) array of its own), as torchvision's ``decode_jpeg`` gives a JPEG: what
    follows (a crop, a resize, :func:`tensor_to_pil`) copies only what it keeps, where a channels-first copy of a
    12 MP image here took 45 ms."""
    with warnings.catch_warnings():  # Pillow's advice to convert a palette image with transparency through RGBA,
        warnings.simplefilter("ignore", UserWarning)  # printed by every worker: its RGB colours are these
        rgb = img if img.mode == "RGB" else img.convert("RGB")  # Pillow's convert to its own mode copies it whole
        pixels = np.array(rgb)  # (H, W, 3), writable, its own (a lazy image decodes here)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 (3, H, W) RGB tensor of :func:`decode_bytes` as a PIL image (what timm's transforms take). A photo
    turned upright by a quarter turn is a transposed view of the decoder's rows: Pillow transposes it back (123 ms on
    a 12 MP photo), where copying the strided view took 527 ms."""
    pixels = image.permute(1, 2, 0)
    if not pixels.is_contiguous() and pixels.transpose(0, 1).is_contiguous():
        return Image.fromarray(pixels.transpose(0, 1).numpy()).transpose(Image.Transpose.TRANSPOSE)
    return Image.fromarray(pixels.numpy())


def decode_bytes(data: bytes, name: str, max_pixels: int | None = None) -> torch.Tensor:
    """Encoded image bytes -> uint8 (3, H, W) RGB; ValueError naming ``name`` when undecodable or too large.

    ``max_pixels`` (default :func:`max_image_pixels`) bounds width x height, checked on the
    header before decoding. PNG goes to Pillow: libpng, through torchvision, crashes the process
    on an IDAT stream shorter than the header promises.
    """
    return _decode(data, name, max_pixels, rgb=True)


def check_bytes(data: bytes, name: str, max_pixels: int | None = None) -> None:
    """None where :func:`decode_bytes` decodes ``data``, else the error it raises, for less where Pillow decodes it
    (a PNG, TIFF, BMP, GIF): the decoded image's conversion to RGB is tried on a 1x1 crop of it, which keeps its mode,
    palette and transparency, what picks Pillow's converter and so whether it fails; the whole image's copies to RGB
    and to a tensor are left out. A JPEG (the cut check reads its pixels) or a WebP libwebp takes is decoded whole."""
    _decode(data, name, max_pixels, rgb=False)


def _decode(data: bytes, name: str, max_pixels: int | None, rgb: bool) -> torch.Tensor:
    """:func:`decode_bytes`; ``rgb`` False: an image Pillow decodes (not a JPEG) is converted as a 1x1 crop of it."""
    kind, size, limit = _checked_header(data, name, max_pixels)
    if kind == "jpeg" or (kind == "webp" and _upright(data, name, limit)):
        # libjpeg / libwebp through torchvision, unless it refuses (CMYK, ...); its WebP decoder ignores EXIF.
        try:
            with warnings.catch_warnings():  # torchvision announces its decoders' move to torchcodec: noise
                warnings.simplefilter("ignore", DeprecationWarning)
                from torchvision.io import ImageReadMode, decode_jpeg, decode_webp  # lazy: slow to import

                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if kind == "jpeg":  # EXIF orientation: phone photos are often stored sideways with a rotation tag
                    # as Pillow reads it, which every size taken from the header (oriented_size) follows: libjpeg's
                    # reader differs on a damaged EXIF block, which would rotate the pixels but not the size
                    turn = _jpeg_orientation(data)
                    image = _orient(decode_jpeg(encoded, mode=ImageReadMode.RGB,
                                                apply_exif_orientation=turn is None), turn or 1)
                else:
                    image = decode_webp(encoded, mode=ImageReadMode.RGB)
        except Exception:  # torchvision refuses: Pillow tries
            image = None
        if image is not None and image.dtype == torch.uint8 and image.shape[0] == 3 and image.numel() > 0:
            return _whole(image, data, name, kind)
    try:  # Pillow: PNG, GIF's first frame, BMP, TIFF; CMYK or 16-bit JPEG
        with _open_checked(data, name, kind, size, limit) as img:
            img.load()
            if img.format == "PNG" and png_cut_short(img, data):
                raise png_cut_error(name)
            # Pillow turns a TIFF by its orientation tag as it loads it: exif_transpose has nothing left to do
            img = img if img.format == "TIFF" else ImageOps.exif_transpose(img)
            if img.mode == "F":  # Pillow's convert would clip it to 0..255: a 0..1 image would come out black
                raise ImageFileError(name, "a 32-bit floating-point image has no known value range; convert it to "
                                           "8 or 16 bits")
            if img.mode in WIDE_MODES:  # 16 bits, as torchvision scales them; a 32-bit "I" holds no depth
                arr = np.asarray(img, dtype=np.float64)
                if arr.size and (arr.min() < 0 or arr.max() > 65535):  # signed (CT in HU) or wider: clipping loses it
                    raise ImageFileError(name, f"a 32-bit integer image with values from {arr.min():.0f} to "
                                               f"{arr.max():.0f} has no known range; convert it to 8 or 16 bits")
                arr = arr / (255.0 if img.mode == "I" and arr.max() <= 255 else 65535.0) * 255.0
                grey = arr.clip(0, 255).astype(np.uint8)
                grey = grey if rgb or kind == "jpeg" else grey[:1, :1]
                # RGB as Pillow's L to RGB gives it: the grey thrice, channels first (three straight copies, where a
                # round trip through Pillow took 17x as long on 12 MP)
                return _whole(torch.from_numpy(np.broadcast_to(grey, (3, *grey.shape)).copy()), data, name, kind)
            return _whole(pil_to_tensor(img if rgb or kind == "jpeg" else img.crop((0, 0, 1, 1))), data, name, kind)
    except Exception as exc:
        if isinstance(exc, ImageFileError) and exc.path == str(name):
            raise  # ours (the header checks', the modes', a cut JPEG's), naming the file
        # Pillow's own errors name no file, its ValueErrors too (a GIF frame of 0x0: 'tile cannot extend outside
        # image'), and the datasets' skip warnings print the message alone
        raise ImageFileError(name, exception_line(exc)) from exc


def _whole(image: torch.Tensor, data: bytes, name: str, kind: str | None) -> torch.Tensor:
    """``image``, unless it is a JPEG cut short whose rest libjpeg filled grey (:mod:`lomar.data.jpeg_cut`)."""
    if kind == "jpeg" and grey_corner(image) and cut_short(data):
        raise cut_error(name)
    return image


def _jpeg_orientation(data: bytes) -> int | None:
    """A JPEG's EXIF orientation as :func:`oriented_size` reads it (1 where Pillow reads none, or no EXIF block);
    None where Pillow cannot open the file at all, which libjpeg may still decode (junk between markers)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a damaged EXIF block's notes; Pillow's bomb warning (limits are ours)
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
                return exif_orientation(img) or 1
    except Exception:
        return None


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) ``image`` turned upright as EXIF ``orientation`` says, as ``ImageOps.exif_transpose`` turns it:
    flipped as stored (a copy in the decoder's layout), then transposed as a view, as torchvision turns it;
    the crop that follows copies only itself (copying a transposed 12 MP photo whole took 0.3-0.6 s)."""
    flips, transpose = {2: ((-1,), False), 3: ((-2, -1), False), 4: ((-2,), False), 5: ((), True),
                        6: ((-2,), True), 7: ((-2, -1), True), 8: ((-1,), True)}.get(orientation, ((), False))
    image = image.flip(flips) if flips else image
    return image.transpose(-2, -1) if transpose else image


def _upright(data: bytes, name: str, limit: int) -> bool:
    """Whether an image's EXIF asks for no rotation or flip."""
    with open_pil(data, name, limit) as img:
        return exif_orientation(img) in (0, 1)


def load_image(path: str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """Read and decode an image file: uint8 (3, H, W) RGB; ValueError naming the file when unreadable."""
    return decode_bytes(read_image_bytes(path), str(path), max_pixels)


def decode_box_reduced(img: Image.Image, box: tuple[int, int, int, int], size: int,
                       name: str) -> tuple[Image.Image, tuple]:
    """Decode the opened photo ``img`` (header read) at the first JPEG scale of 1/8, 1/4, 1/2 that keeps the crop
    ``box`` (top, left, height, width in upright full-size pixels) >= ``size`` px on each side: the one DCT-scale rule
    of the training crops (pretrain's and finetune's ``--decode draft``). Anything but a JPEG is decoded whole.
    :class:`~lomar.data.image_errors.ImageFileError` (a ValueError) naming ``name`` (the file ``img`` was read from)
    for one Pillow cannot decode, or a JPEG or PNG cut short.

    Returns (decoded PIL image, box in its coordinates as floats (left, top, right, bottom)).
    """
    width, height = img.size  # as stored
    upright_h, upright_w = oriented_size(img)  # the box's frame: a phone's portrait photo is stored sideways
    top, left, h, w = box
    if img.format in JPEG_FORMATS:  # the same scale either way up: both sides of the crop stay >= size
        for scale in (8, 4, 2, 1):
            if h / scale >= size and w / scale >= size:
                # Pillow decodes at the largest scale of 8, 4, 2 at most width // requested width: ask floor.
                img.draft("RGB", (width // scale, height // scale))
                break
    source, opened, jpeg = getattr(img, "fp", None), img, img.format in JPEG_FORMATS  # from bytes, kept after decoding
    with warnings.catch_warnings():  # Pillow's advice on palette transparency, from every worker (see pil_to_tensor)
        warnings.simplefilter("ignore", UserWarning)
        try:
            img = img.convert("RGB")  # decodes (at the draft scale, if one was set)
        except Exception as exc:  # Pillow's own ("image file is truncated", ...) names no file: as decode_bytes
            raise ImageFileError(name, exception_line(exc)) from exc
    if jpeg and hasattr(source, "getvalue") and grey_corner(img) and cut_short(source.getvalue()):
        raise cut_error(name)
    if opened.format == "PNG" and hasattr(source, "getvalue") and png_cut_short(opened, source.getvalue()):
        raise png_cut_error(name)
    if exif_orientation(img) not in (0, 1):  # turned upright after the reduced decode, on a few megapixels
        img = ImageOps.exif_transpose(img)
    sx, sy = img.size[0] / upright_w, img.size[1] / upright_h
    return img, (left * sx, top * sy, (left + w) * sx, (top + h) * sy)


def load_image_reduced(path: str | Path, min_side: int, max_pixels: int | None = None) -> torch.Tensor:
    """:func:`load_image`'s image shrunk by the largest of 8, 4, 2 that divides both sides of a JPEG and leaves its
    shorter side at least ``min_side`` px, decoded at that scale (libjpeg's DCT scaling, Pillow's ``draft``): a
    12 MP photo that an evaluation resizes to 256 px is decoded at 1/8. The sides divide, so the image keeps the
    full one's proportions exactly and a resize of its short side gives the full decode's size; the pixels differ
    slightly (a DCT-domain low-pass, not a resampling). Any other file, or one that Pillow fails to decode this way,
    is :func:`load_image`'s, bit for bit, and unreadable where it is."""
    data, name = read_image_bytes(path), str(path)
    with open_pil(data, name, max_pixels) as img:
        width, height = img.size  # as stored: each scale divides both sides either way up
        scale = next((s for s in (8, 4, 2) if width % s == height % s == 0 and min(width, height) // s >= min_side), 1)
        if img.format in JPEG_FORMATS and img.mode in ("RGB", "L") and scale > 1:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a damaged EXIF block's notes, from every worker
                    img.draft("RGB", (width // scale, height // scale))
                    pixels = pil_to_tensor(img)
                whole = not (grey_corner(pixels) and cut_short(data))  # else decode_bytes refuses it, named
                if whole and pixels.shape[-2:] == (height // scale, width // scale):
                    return _orient(pixels, exif_orientation(img) or 1)  # as decode_bytes reads the tag
            except Exception:  # what Pillow cannot decode, libjpeg through torchvision may: the reference decides
                pass
    return decode_bytes(data, name, max_pixels)
