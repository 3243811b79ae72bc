"""Image dimensions as the decoder that will decode them reads the header, without decoding.

A pixel limit checked on Pillow's reading of a header does not bound libjpeg: the two parse
JPEG markers differently (Pillow rejects markers libjpeg skips), so a few hundred bytes that
Pillow cannot identify can still make libjpeg allocate gigabytes. Each parser here follows the decoder it stands for:

* JPEG: libjpeg's ``read_markers`` (jdmarker.c): from SOI, skip junk bytes and fill bytes
  between markers and each segment by its length, up to the scan; the one SOFn frame header
  (libjpeg refuses a second one, where Pillow keeps the last).
* PNG: the IHDR chunk, which must come first; and the critical chunks' CRCs, which libpng checks and
  Pillow does not.
* WebP: the VP8X canvas and the first VP8 / VP8L bitstream header (libwebp decodes at the
  bitstream's size and refuses a still image whose size differs from the canvas).
"""

from __future__ import annotations

import struct
import zlib

__all__ = ["image_format", "foreign_format", "declared_size", "jpeg_frame_size", "jpeg_single_scan", "jpeg_scan_start",
           "png_size", "png_bad_chunk", "webp_size"]

# SOF0-15 except DHT (C4), JPG (C8) and DAC (CC), which share the range.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PARAMETERLESS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_format(data: bytes) -> str | None:
    """"jpeg", "png", "gif" or "webp" from the signature torchvision's ``decode_image`` dispatches on."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] == _PNG_SIGNATURE[:4]:
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:15] == b"WEBPVP8":
        return "webp"
    return None


# ISO base media brands (the ftyp box's major brand) of the photo formats a phone or camera saves instead of JPEG
_FTYP_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC", b"heis": "HEIC", b"hevc": "HEIC", b"hevx": "HEIC",
                b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}


def foreign_format(data: bytes) -> str | None:
    """"HEIC", "HEIF", "AVIF" or "JPEG XL" when ``data`` is a photo in one of those formats (which lomar does not
    decode; an iPhone's HEIC renamed .jpg, say), from its signature; else None."""
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12])
    if data[:2] == b"\xff\x0a" or data[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "JPEG XL"
    return None


def _jpeg_header_markers(data: bytes):
    """(marker, offset just past it) of each marker up to and including the first scan (SOS), as libjpeg's
    ``read_markers`` finds them: junk and fill bytes between markers skipped, each segment skipped by its length.
    Ends early at SOI or EOI (libjpeg errors there) or at the end of the data."""
    i, n = 2, len(data)
    while True:
        while True:  # next_marker(): junk until 0xFF, then fill bytes; FF 00 is stuffed data
            while i < n and data[i] != 0xFF:
                i += 1
            while i < n and data[i] == 0xFF:
                i += 1
            if i >= n:
                return
            marker, i = data[i], i + 1
            if marker:
                break
        yield marker, i
        if marker in (0xDA, 0xD8, 0xD9):
            return
        if marker in _PARAMETERLESS:
            continue
        if i + 2 > n:
            return
        i += max(struct.unpack_from(">H", data, i)[0], 2)  # the length counts its own two bytes


def jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the frame header, found as libjpeg finds it; None where libjpeg
    refuses the file: no frame header before the scan, or two of them."""
    if data[:2] != b"\xff\xd8":
        return None
    size = None
    for marker, i in _jpeg_header_markers(data):
        if marker in _SOF:
            if size is not None or i + 7 > len(data):
                return None
            height, width = struct.unpack_from(">HH", data, i + 3)  # after length (2) and precision (1)
            size = width, height  # then skipped by its length, as any segment
        elif marker == 0xDA:  # the scan: the header is complete
            return size
    return None  # SOI again, or EOI, before the scan (libjpeg errors), or the data ended


def jpeg_single_scan(data: bytes) -> bool:
    """Whether libjpeg reads at most one scan of this JPEG: a sequential (not progressive) frame whose first scan
    holds every component, after which libjpeg takes another scan for an error (``JERR_EOI_EXPECTED``, jdinput.c).
    False where that is not certain."""
    return jpeg_scan_start(data) is not None


def jpeg_scan_start(data: bytes) -> int | None:
    """Offset of the image data (past the SOS segment, by its length) of a JPEG that :func:`jpeg_single_scan`
    finds libjpeg reads one scan of; None for any other."""
    components = None
    for marker, i in _jpeg_header_markers(data):
        if marker in _SOF and i + 8 <= len(data):
            components = None if marker in _PROGRESSIVE_SOF else data[i + 7]  # Nf, after the frame's size
        elif marker == 0xDA:
            single = components is not None and i + 3 <= len(data) and data[i + 2] == components  # Ns == Nf
            return i + struct.unpack_from(">H", data, i)[0] if single else None
    return None


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from IHDR; None when the first chunk is not a 13-byte IHDR (libpng refuses)."""
    if data[:8] != _PNG_SIGNATURE or len(data) < 24 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    return struct.unpack_from(">II", data, 16)


def png_bad_chunk(data: bytes) -> tuple[str, int] | None:
    """(type, offset) of the first critical chunk (IHDR, PLTE, IDAT, IEND: an upper-case first letter) whose CRC does
    not match its bytes, as libpng refuses it; None when every complete one matches. Pillow checks no IDAT's CRC: a
    PNG damaged on disk decodes without an error, its rows from the damage on garbage. A chunk cut short by the end
    of the file is left to the decoder, which calls the file truncated."""
    i, n, view = 8, len(data), memoryview(data)  # a view: a slice would copy each chunk (a 36 MB IDAT: 36 MB)
    while i + 12 <= n:
        length = struct.unpack_from(">I", data, i)[0]
        end = i + 8 + length
        if end + 4 > n:
            return None
        kind = data[i + 4:i + 8]
        if not kind[0] & 0x20 and zlib.crc32(view[i + 4:end]) != struct.unpack_from(">I", data, end)[0]:
            return kind.decode("latin-1"), i
        if kind == b"IEND":
            return None
        i = end + 4
    return None


def webp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height), the largest of the VP8X canvas and the first VP8 / VP8L bitstream header
    (each side separately); None when neither is readable."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    sizes: list[tuple[int, int]] = []
    i, n = 12, len(data)
    while i + 8 <= n:
        tag, length = data[i:i + 4], struct.unpack_from("<I", data, i + 4)[0]
        body = data[i + 8:i + 8 + min(length, 30)]
        if tag == b"VP8X" and len(body) >= 10:
            sizes.append((1 + int.from_bytes(body[4:7], "little"), 1 + int.from_bytes(body[7:10], "little")))
        elif tag == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
            bits = int.from_bytes(body[1:5], "little")
            sizes.append((1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)))
        elif tag == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
            sizes.append((struct.unpack_from("<H", body, 6)[0] & 0x3FFF, struct.unpack_from("<H", body, 8)[0] & 0x3FFF))
        if tag in (b"VP8L", b"VP8 "):
            break
        i += 8 + length + (length & 1)  # chunks are padded to even sizes
    if not sizes:
        return None
    return max(w for w, _ in sizes), max(h for _, h in sizes)


def declared_size(data: bytes) -> tuple[str | None, tuple[int, int] | None]:
    """(format from the signature, (width, height) as that format's decoder reads it, or None)."""
    kind = image_format(data)
    parse = {"jpeg": jpeg_frame_size, "png": png_size, "webp": webp_size}.get(kind or "")
    return kind, (parse(data) if parse else None)
