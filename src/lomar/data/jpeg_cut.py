"""A JPEG cut short and then closed (a partial download or copy, ended by an EOI marker): libjpeg decodes it without
an error, its blocks past the cut all zero, i.e. mid-grey (128, 128, 128), and says so only on the process's stderr
("Corrupt JPEG data: premature end of data segment", without the file's name). torchvision's decoder leaves
libjpeg's warnings to that default output and Pillow's discards them: neither tells its caller.

So a decoded JPEG with a mid-grey corner (where the last block lands, whatever its EXIF orientation) is checked
again here: Pillow decodes its image data with the closing marker replaced by a few zero bytes, which a complete
scan never needs (libjpeg reads ahead 25 bits at most), and runs out of data where the scan was cut.
The corner check costs 40 us on a 12 MP photo, whose decode takes 80 ms (200 such photos: 0.995 times the time
without it in all, within noise); the check of a suspect, a Pillow decode (70 ms more on that photo).

Not recognised: a progressive JPEG cut short (blurred past the cut, not grey); a cut within the last few blocks
(the corner's own, or whole ones its chroma upsampling blends in); an arithmetic-coded JPEG (Pillow's decoder stops
on one with another error than running out of data) and a CMYK one (its fill is not grey); libjpeg's other
notes (junk bytes before a marker, which it skips: the pixels are whole). Nor is what ``--decode gpu``'s device
decoder (nvjpeg) decodes checked.
"""

from __future__ import annotations

import io
import re
import warnings

import torch
from PIL import Image

from lomar.data.headers import jpeg_scan_start
from lomar.data.image_errors import ImageFileError

__all__ = ["GREY", "grey_corner", "unclosed", "cut_short", "cut_error"]

GREY = 128  # a block of zero coefficients, every channel: libjpeg's fill for the data it did not get
_SPARE = 8  # zero bytes in place of the closing marker: twice libjpeg's read-ahead (MIN_GET_BITS: 25 bits)


def grey_corner(image: torch.Tensor | Image.Image) -> bool:
    """Whether a (C, H, W) uint8 tensor or an RGB PIL image has a corner pixel of :data:`GREY` in every channel."""
    if isinstance(image, Image.Image):
        width, height = image.size
        corners = ((0, 0), (width - 1, 0), (0, height - 1), (width - 1, height - 1))
        return any(image.getpixel(corner) == (GREY, GREY, GREY) for corner in corners)
    return bool(image[:, [0, 0, -1, -1], [0, -1, 0, -1]].eq(GREY).all(0).any())


# a marker's 0xFF: followed by neither a stuffed 0x00, a fill 0xFF (the run's last one is the marker's) nor RST0-7
_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


def _scan_end(data: bytes, start: int) -> int | None:
    """Offset of the marker ending the entropy-coded data that starts at ``start``: the first 0xFF followed by
    neither a stuffed 0x00, a fill 0xFF nor a restart marker (RST0-7), as libjpeg finds it. A regular expression:
    a 12 MP photo's scan holds some 15,000 stuffed bytes, 6 ms in a Python loop, 2 ms here."""
    found = _MARKER.search(data, start)
    return None if found is None else found.start()


def unclosed(data: bytes) -> bytes | None:
    """A JPEG whose first scan is closed by the file's closing marker (EOI) with that marker replaced by zero bytes,
    which a complete scan never reads and Pillow runs out of where the scan was cut; None for any other JPEG (a
    progressive or multi-scan file, another marker after the scan), which libjpeg does not fill grey this way."""
    start = jpeg_scan_start(data)
    end = _scan_end(data, start) if start is not None else None
    return None if end is None or data[end + 1] != 0xD9 else data[:end] + bytes(_SPARE)


def cut_short(data: bytes) -> bool:
    """Whether libjpeg runs out of this single-scan JPEG's image data before its last block and fills the rest
    grey: the scan ends at the file's closing marker (EOI) and Pillow, given :func:`unclosed`'s bytes, runs out of
    data. False where that is not certain (a progressive or multi-scan file, another marker after the
    scan, a decoder error of another kind, Pillow's ``LOAD_TRUNCATED_IMAGES`` set)."""
    if (opened := unclosed(data)) is None:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning (the size was checked) and EXIF notes
            with Image.open(io.BytesIO(opened), formats=("JPEG",)) as img:
                img.load()
        return False
    except OSError as exc:  # Pillow's message when its decoder asks for more data than the file holds
        return "image file is truncated" in str(exc)
    except Exception:
        return False


def cut_error(name: str) -> ImageFileError:
    return ImageFileError(name, "its JPEG image data ends before its last rows (the file was cut short, as by a "
                                "partial download or copy; libjpeg would fill the rest grey); replace or remove it")
