"""TIFFs whose strips (or tiles) cannot hold the rows their tags declare.

Pillow decodes an uncompressed TIFF strip by strip and leaves the rows of a strip that is not there zero, without an
error: a file declaring more rows (ImageLength) than its strips hold trains as black rows, as a cut PNG did
(:mod:`lomar.data.png_cut`). libtiff, which decodes the compressed ones, fails on them with 'decoder error -2',
which names nothing. The tags alone decide it, read before any pixel is allocated: a strip missing or empty, a strip
that ends (uncompressed: whose rows end) past the end of the file, and, uncompressed, a strip's byte count short of
its rows. Only the first image (frame) is read, as the decoders read only it. A file whose tags cannot be read is left
to Pillow, which says why.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from lomar.data.image_errors import ImageFileError

__all__ = ["tiff_cut", "tiff_cut_error"]

_WIDTH, _LENGTH, _BITS, _COMPRESSION, _PHOTOMETRIC, _SAMPLES = 256, 257, 258, 259, 262, 277
_STRIP_OFFSETS, _ROWS_PER_STRIP, _STRIP_COUNTS, _PLANAR = 273, 278, 279, 284
_TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_COUNTS = 322, 323, 324, 325
_WANTED = {_WIDTH, _LENGTH, _BITS, _COMPRESSION, _PHOTOMETRIC, _SAMPLES, _STRIP_OFFSETS, _ROWS_PER_STRIP,
           _STRIP_COUNTS, _PLANAR, _TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_COUNTS}
_TYPES = {1: "u1", 3: "u2", 4: "u4", 16: "u8"}  # BYTE, SHORT, LONG, LONG8 (BigTIFF)
_OLD_JPEG, _YCBCR, _CAP = 6, 6, 1 << 62  # compression 6 keeps its data outside the strips; sizes capped for int64


def _tags(data: bytes) -> dict[int, np.ndarray] | None:
    """The wanted tags of the first IFD of a TIFF or BigTIFF, each an array; None where they cannot be read."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 16:
        return None
    version = struct.unpack_from(order + "H", data, 2)[0]
    if version not in (42, 43):
        return None
    big = version == 43
    head, entry, slot, count_fmt = (("Q", 20, 8, "Q") if big else ("H", 12, 4, "I"))
    ifd = struct.unpack_from(order + ("Q" if big else "I"), data, 8 if big else 4)[0]
    if ifd + (8 if big else 2) > len(data):
        return None
    entries = struct.unpack_from(order + head, data, ifd)[0]
    found = {}
    for at in range(ifd + (8 if big else 2), min(ifd + (8 if big else 2) + entries * entry, len(data) - entry + 1),
                    entry):
        tag, kind = struct.unpack_from(order + "HH", data, at)
        if tag not in _WANTED or kind not in _TYPES:
            continue
        count = struct.unpack_from(order + count_fmt, data, at + 4)[0]
        dtype = np.dtype(_TYPES[kind]).newbyteorder(order)
        size = count * dtype.itemsize
        where = at + (12 if big else 8)  # the value itself where it fits the entry's slot, else its offset
        if size > slot:
            where = struct.unpack_from(order + ("Q" if big else "I"), data, where)[0]
        if where + size > len(data):
            return None  # Pillow drops such a tag ('Tag data larger than file') and says what that leaves
        found[tag] = np.frombuffer(data, dtype, count, where)
    return found


def _scalar(tags: dict[int, np.ndarray], tag: int, default: int | None = None) -> int | None:
    values = tags.get(tag)
    return int(values[0]) if values is not None and len(values) else default


def tiff_cut(data: bytes) -> str | None:
    """What of a TIFF's declared rows its strips or tiles cannot hold ('strip 3 of 8 ends at byte ..., past the
    file's end at ...'); None for a complete one, or one whose tags cannot tell."""
    tags = _tags(data)
    if tags is None or _STRIP_OFFSETS not in tags and _TILE_OFFSETS not in tags:
        return None
    width, height = _scalar(tags, _WIDTH), _scalar(tags, _LENGTH)
    samples, planar = _scalar(tags, _SAMPLES, 1), _scalar(tags, _PLANAR, 1)
    bits = [int(b) for b in tags.get(_BITS, [1])] or [1]
    if not width or not height or not samples or _scalar(tags, _COMPRESSION, 1) == _OLD_JPEG:
        return None
    pixel_bits = bits[0] if planar == 2 else (sum(bits) if len(bits) == samples else bits[0] * samples)
    planes = samples if planar == 2 else 1
    if _STRIP_OFFSETS in tags:
        unit, offsets, counts = "strip", tags[_STRIP_OFFSETS], tags.get(_STRIP_COUNTS)
        rows = min(_scalar(tags, _ROWS_PER_STRIP, height) or height, height)
        per_plane, line = math.ceil(height / rows), math.ceil(width * pixel_bits / 8)
        full, last = rows * line, (height - (per_plane - 1) * rows) * line
    else:
        unit, offsets, counts = "tile", tags[_TILE_OFFSETS], tags.get(_TILE_COUNTS)
        tile_width, tile_length = _scalar(tags, _TILE_WIDTH), _scalar(tags, _TILE_LENGTH)
        if not tile_width or not tile_length:
            return None
        per_plane = math.ceil(width / tile_width) * math.ceil(height / tile_length)
        full = last = tile_length * math.ceil(tile_width * pixel_bits / 8)  # a tile is padded to its full size
    expected = per_plane * planes
    held = len(offsets) if counts is None else min(len(offsets), len(counts))
    if held < expected:
        return f"header declares {height:,} rows in {expected:,} {unit}s and the file lists {held:,}"
    offsets = offsets[:expected].astype(np.uint64)
    size = np.uint64(len(data))
    if counts is None:  # a writer's omission Pillow reads past: each strip must at least start in the file
        beyond = np.flatnonzero(offsets >= size)
        return f"{unit} {beyond[0] + 1} of {expected:,} starts past the file's end" if len(beyond) else None
    counts = counts[:expected].astype(np.uint64)
    if len(empty := np.flatnonzero(counts == 0)):
        return f"{unit} {empty[0] + 1} of {expected:,} is empty (0 bytes)"
    raw = _scalar(tags, _COMPRESSION, 1) == 1 and _scalar(tags, _PHOTOMETRIC, 2) != _YCBCR  # subsampled: other sizes
    need = np.full(expected, min(full, _CAP), dtype=np.uint64)
    need[per_plane - 1::per_plane] = min(last, _CAP)
    # Pillow reads an uncompressed unit's rows from its offset, whatever its count says: a count past the file's
    # end that the rows stay within (a writer that counts each strip full, the last one too) loses no row
    ends = np.minimum(counts, need) if raw else counts
    beyond = np.flatnonzero((offsets > size) | (ends > size - np.minimum(offsets, size)))
    if len(beyond):
        i = int(beyond[0])
        return (f"{unit} {i + 1} of {expected:,} ends at byte {int(offsets[i]) + int(ends[i]):,}, past the file's "
                f"end at {len(data):,}")
    if not raw:
        return None
    if len(short := np.flatnonzero(counts < need)):
        i = int(short[0])
        return f"uncompressed {unit} {i + 1} of {expected:,} holds {int(counts[i]):,} bytes of the {int(need[i]):,} " \
               f"its rows need"
    return None


def tiff_cut_error(name: str, why: str) -> ImageFileError:
    return ImageFileError(name, f"a TIFF whose {why} (the file was cut short or its tags are wrong; Pillow would "
                                f"leave the missing rows black); replace or remove it")
