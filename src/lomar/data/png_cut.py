"""PNGs whose pixel data ends before the rows their header declares.

A PNG's compressed stream can end (a complete zlib stream, its chunks' CRCs right) rows before the height its IHDR
gives: a writer stopped early and closed the file, or a header made to declare more. Pillow then decodes without an
error, the rows it never received left zero (a 106-byte file declaring 1x65535 decoded to 65,535 rows, 299 of them
read). Such an image is refused, as a JPEG cut short is (:mod:`lomar.data.jpeg_cut`). The check costs one inflate
of the pixel data, so it runs only on an image whose last row (an interlaced one's last pass's) decoded all zero, as
a cut one's does.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image

from lomar.data.image_errors import ImageFileError

__all__ = ["PNG_CUT", "png_cut_short", "png_cut_error"]

_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type: grey, RGB, palette, grey + alpha, RGBA
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _row_bytes(width: int, bits: int) -> int:
    return 1 + (width * bits + 7) // 8  # the filter byte, then the packed pixels


def _raw_size(width: int, height: int, depth: int, colour: int, interlaced: bool) -> int | None:
    """Bytes the IHDR's image inflates to (filter bytes included); None for a colour type PNG does not define."""
    if colour not in _CHANNELS:
        return None
    bits = _CHANNELS[colour] * depth
    if not interlaced:
        return height * _row_bytes(width, bits)
    total = 0
    for x0, y0, dx, dy in _ADAM7:  # each pass is a small image of its own rows; an empty one writes nothing
        cols, rows = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        total += rows * _row_bytes(cols, bits) if cols else 0
    return total


def _chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset of its data, length) of each chunk whose header the file holds, in order."""
    i = 8
    while i + 8 <= len(data):
        length = struct.unpack_from(">I", data, i)[0]
        yield data[i + 4:i + 8], i + 8, length
        i += 12 + length


def _header(data: bytes) -> tuple[int, int, int, int, bool] | None:
    """(width, height, bit depth, colour type, interlaced) of the IHDR Pillow decodes by: the last one before the
    pixel data (a second IHDR replaces the first; its size is the one ``open_pil`` checked). None if none is read."""
    found = None
    for kind, at, _ in _chunks(data):
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"IHDR" and at + 13 <= len(data):
            width, height, depth, colour, _, _, interlace = struct.unpack_from(">IIBBBBB", data, at)
            found = width, height, depth, colour, interlace == 1
    return found


def _rows_missing(data: bytes, header: tuple[int, int, int, int, bool]) -> bool:
    """Whether the IDAT chunks of this PNG inflate to fewer bytes than its IHDR's (``header``'s) rows need. Inflated
    in pieces, counted and dropped: no copy of the image is kept. False where the file cannot be read that far (the
    decoder has said why)."""
    need = _raw_size(*header)
    if need is None:
        return False
    inflate, got, view = zlib.decompressobj(), 0, memoryview(data)
    try:
        for kind, at, length in _chunks(data):
            if got >= need or kind == b"IEND":
                break
            if kind == b"IDAT":
                piece = view[at:at + length]
                while piece and got < need:
                    got += len(inflate.decompress(piece, 1 << 20))
                    piece = inflate.unconsumed_tail
    except zlib.error:
        return False
    return got < need


def _last_written(width: int, height: int, interlaced: bool) -> tuple[int, slice]:
    """(row, columns) of the pixels the last raw row fills, which stay zero in any image cut short: the image's last
    row, or in an interlaced one its last pass's (the last odd row; in a one-row image, pass 6's odd columns)."""
    if not interlaced:
        return height - 1, slice(None)
    x0, y0, dx, dy = next(p for p in reversed(_ADAM7) if width > p[0] and height > p[1])
    return y0 + (height - 1 - y0) // dy * dy, slice(x0, None, dx)


def png_cut_short(img: Image.Image, data: bytes) -> bool:
    """Whether ``img``, a PNG loaded from ``data``, ends in rows its data never held: the pixels its last raw row
    fills decoded all zero and its pixel data inflates to fewer bytes than its header's rows need."""
    header = _header(data)
    row, columns = _last_written(img.width, img.height, bool(header and header[4]))
    last = np.asarray(img.crop((0, row, img.width, row + 1)))[0, columns]
    return not last.any() and header is not None and _rows_missing(data, header)


PNG_CUT = ("its PNG pixel data ends before the last rows its header declares (the file was cut short or its header "
           "is wrong; Pillow would leave them black)")


def png_cut_error(name: str) -> ImageFileError:
    return ImageFileError(name, f"{PNG_CUT}; replace or remove it")
