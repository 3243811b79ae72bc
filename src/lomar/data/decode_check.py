"""Whether an image file reads, at the cost of a header and a reduced decode: the start-up check that a training
class holds a readable image (:meth:`lomar.data.folder.LabelledImageFolder.unreadable_classes`).

A JPEG decoded at 1/8 (libjpeg's DCT scaling, Pillow's ``draft``) still entropy-decodes its whole scan: only the
inverse transform is smaller, so a 4000x3000 photo checks 2-6x faster than its full decode (entropy decoding is
the floor: slowest on a textured photo's dense data), and a file cut short fails as the full decode fails. Pillow
raises on a JPEG whose data runs out ("image file is truncated"; lomar never sets ``LOAD_TRUNCATED_IMAGES``); a JPEG
cut short and then closed by an EOI marker, which libjpeg fills grey, is
decoded with that marker replaced by zero bytes (:func:`lomar.data.jpeg_cut.unclosed`), so it runs out of data too.
Wherever this decode fails or is not taken (a PNG, a CMYK JPEG, a file Pillow cannot open), the full decode gives the
verdict and the error (:func:`lomar.data.decode.check_bytes`: :func:`~lomar.data.decode.decode_bytes` without the copies
of a PNG's or TIFF's whole image to RGB: 0.80-0.83x load_image's time on a 12 MP RGB PNG, 0.17-0.18x on a raw
TIFF, 0.72-1.12x on an LZW one): a check
fails exactly where :func:`lomar.data.decode.load_image` fails, with its message."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image

from lomar.data.decode import JPEG_FORMATS, check_bytes, open_pil, read_image_bytes
from lomar.data.jpeg_cut import unclosed

__all__ = ["check_image"]


def check_image(path: str | Path, max_pixels: int | None = None) -> None:
    """None where :func:`lomar.data.decode.load_image` decodes ``path``, else the ValueError it raises; a JPEG of
    8-bit RGB or grey is decoded at 1/8 scale."""
    data, name = read_image_bytes(path), str(path)
    try:
        with open_pil(data, name, max_pixels) as img:  # the header checks: pixel limits, format, frame sizes
            reduced = img.format in JPEG_FORMATS and img.mode in ("RGB", "L")
            width, height = img.size
        if reduced:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a damaged EXIF block's notes; Pillow's bomb warning (checked above)
                with Image.open(io.BytesIO(unclosed(data) or data), formats=JPEG_FORMATS) as img:
                    img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                    img.load()
            return
    except Exception:  # what Pillow cannot read this way, libjpeg through torchvision may: the full decode decides
        pass
    check_bytes(data, name, max_pixels)
