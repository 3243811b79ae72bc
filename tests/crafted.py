"""Hostile files written byte by byte for the tests: headers that claim far more pixels than the
file holds, headers one decoder reads and another does not, paths that are not files.

Import them (``from crafted import ...``); each returns the file's bytes or creates the path.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

HUGE = 60_000  # 60000² = 3.6e9 pixels: ~10.8 GB as RGB, 20x the default limit


def _segments(data: bytes):
    """(offset, marker, length) of the JPEG's marker segments up to the scan."""
    i = 2
    while data[i + 1] != 0xDA:
        length = struct.unpack_from(">H", data, i + 2)[0]
        yield i, data[i + 1], length
        i += 2 + length


def _sof(width: int, height: int) -> bytes:
    """A one-component 8-bit baseline frame header (SOF0): length 11, precision, height, width,
    one component (id 1, 1x1 sampling, quantisation table 0)."""
    return struct.pack(">BBHBHHB", 0xFF, 0xC0, 11, 8, height, width, 1) + bytes([1, 0x11, 0])


def jpeg(width: int, height: int, pillow_blind: bool = False, then: tuple[int, int] | None = None) -> bytes:
    """A greyscale baseline JPEG with 16x16 pixels of entropy-coded data whose frame header
    claims ``width`` x ``height`` (libjpeg fills what the data does not cover, so it decodes
    at the claimed size).

    ``pillow_blind``: a TEM marker (FF 01) right after SOI: libjpeg skips it, Pillow knows no
    such marker and cannot identify the file. ``then``: a second frame header claiming this
    (width, height) just before the scan; Pillow keeps the last frame header, libjpeg the first.
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buf, "JPEG")
    data = buf.getvalue()
    offset, _, length = next(s for s in _segments(data) if s[1] == 0xC0)
    out = data[:offset] + _sof(width, height) + data[offset + 2 + length:]
    if then is not None:
        scan = next(i for i in range(2, len(out)) if out[i:i + 2] == b"\xff\xda")
        out = out[:scan] + _sof(*then) + out[scan:]
    if pillow_blind:
        out = out[:2] + b"\xff\x01" + out[2:]
    return out


def png_chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    """A PNG chunk: length, type, body and CRC (``crc`` given: that one, right or not)."""
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def grey_png(width: int, height: int, raw: bytes, interlace: int = 0) -> bytes:
    """An 8-bit greyscale PNG whose IHDR declares ``width`` x ``height`` and whose one IDAT is a complete zlib stream
    of ``raw`` (filter bytes and rows as given: fewer rows than the IHDR's make a PNG cut short, CRCs right)."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace))
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def png(width: int, height: int, rows: int | None = None, pillow_blind: bool = False) -> bytes:
    """An 8-bit RGB PNG whose IHDR claims ``width`` x ``height``, with ``rows`` rows of zeros in
    its IDAT (default: all of them; fewer: a stream shorter than the header promises).

    ``pillow_blind``: a tEXt chunk with a wrong CRC after IHDR: libpng warns and drops the
    chunk, Pillow refuses to identify the file.
    """
    rows = height if rows is None else rows
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if pillow_blind:
        out += png_chunk(b"tEXt", b"k\x00v", crc=0)
    return out + png_chunk(b"IDAT", zlib.compress((b"\x00" + bytes(3 * width)) * rows)) + png_chunk(b"IEND", b"")


def webp_lossless(width: int, height: int) -> bytes:
    """RIFF/WEBP with a VP8L bitstream header (14-bit width-1 and height-1) and no image data."""
    bits = (width - 1) | (height - 1) << 14
    body = b"\x2f" + struct.pack("<I", bits) + bytes(5)
    chunk = b"VP8L" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_canvas(width: int, height: int) -> bytes:
    """RIFF/WEBP with a VP8X extended header whose canvas is ``width`` x ``height`` (24 bits each),
    then a 1x1 VP8L bitstream."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little") + \
        (height - 1).to_bytes(3, "little")
    vp8l = webp_lossless(1, 1)[12:]
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x) + len(vp8l)) + b"WEBP" + vp8x + vp8l


def gif(width: int, height: int) -> bytes:
    """GIF89a whose logical screen is ``width`` x ``height`` and whose one frame is 1x1."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + bytes(6)  # 2-colour table
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def fifo(path: Path) -> Path:
    """A named pipe at ``path``: opening it for reading blocks until a writer comes, forever here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def link(path: Path, target: str) -> Path:
    """A symbolic link at ``path`` to ``target`` (e.g. /dev/zero: reading it never ends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def sparse(path: Path, size: int) -> Path:
    """A regular file of ``size`` bytes that takes no disk space (all a hole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def bombs() -> dict[str, bytes]:
    """Name -> bytes of every crafted header over the default pixel limit (178,956,970)."""
    return {
        "blind.jpg": jpeg(HUGE, HUGE, pillow_blind=True),        # Pillow cannot identify it, libjpeg can
        "plain.jpg": jpeg(HUGE, HUGE),                           # both read the same 60000² header
        "first-huge.jpg": jpeg(HUGE, HUGE, then=(16, 16)),       # libjpeg: 60000², Pillow: 16²
        "last-huge.jpg": jpeg(16, 16, then=(HUGE, HUGE)),        # libjpeg: 16², Pillow: 60000²
        "blind.png": png(HUGE, HUGE, rows=1, pillow_blind=True),  # Pillow cannot identify it, libpng can
        "plain.png": png(HUGE, HUGE, rows=1),
        "lossless.webp": webp_lossless(16383, 16383),            # the largest VP8L: 268M pixels
        "canvas.webp": webp_canvas(HUGE, HUGE),
        "screen.gif": gif(HUGE, HUGE),
    }
