"""A TIFF whose strips or tiles cannot hold the rows its tags declare is refused in one line naming the file, before
Pillow leaves the missing rows black; every TIFF Pillow writes, and complete hand-made tiled and planar ones, pass."""

import io
import struct

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from lomar.data.decode import decode_bytes, open_pil
from lomar.data.tiff_cut import tiff_cut

RNG = np.random.default_rng(0)
RGB = RNG.integers(1, 255, (40, 30, 3), dtype=np.uint8)  # no zero pixel: a black row is a missing one


def _pillow(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, "TIFF", **save)
    return out.getvalue()


def _set_tag(data: bytes, tag: int, value: int) -> bytes:
    """``data`` with the first IFD's ``tag`` (one SHORT, LONG or LONG8, stored in its entry) set to ``value``."""
    order = {b"II": "<", b"MM": ">"}[data[:2]]
    big = struct.unpack_from(order + "H", data, 2)[0] == 43
    ifd = struct.unpack_from(order + ("Q" if big else "I"), data, 8 if big else 4)[0]
    count, entry = struct.unpack_from(order + ("Q" if big else "H"), data, ifd)[0], 20 if big else 12
    out = bytearray(data)
    for at in range(ifd + (8 if big else 2), ifd + (8 if big else 2) + count * entry, entry):
        found, kind = struct.unpack_from(order + "HH", data, at)
        if found == tag:
            struct.pack_into(order + {3: "H", 4: "I", 16: "Q"}[kind], out, at + (12 if big else 8), value)
            return bytes(out)
    raise KeyError(tag)


def _made(pixels: np.ndarray, unit: tuple[int, int] | None = None, rows: int = 0, planar: int = 1,
          height: int | None = None, drop: int = 0, counts=None, offsets=None) -> bytes:
    """An uncompressed little-endian TIFF of ``pixels`` (H, W, S) uint8 in strips of ``rows`` rows or tiles of
    ``unit`` (width, length); ``height``, ``drop`` (units left out of the lists), ``counts`` and ``offsets``
    (a function of the right lists) make it wrong."""
    h, w, s = pixels.shape
    planes = [pixels[..., i:i + 1] for i in range(s)] if planar == 2 else [pixels]
    chunks = []
    for plane in planes:
        if unit is None:
            chunks += [plane[y:y + rows].tobytes() for y in range(0, h, rows)]
        else:
            tw, tl = unit
            padded = np.zeros((-(-h // tl) * tl, -(-w // tw) * tw, plane.shape[2]), np.uint8)
            padded[:h, :w] = plane
            chunks += [padded[y:y + tl, x:x + tw].tobytes() for y in range(0, h, tl) for x in range(0, w, tw)]
    chunks = chunks[:len(chunks) - drop]
    data_at = 8
    starts = list(np.cumsum([data_at] + [len(c) for c in chunks[:-1]]))
    sizes = [len(c) for c in chunks]
    starts, sizes = (offsets or list)(starts), (counts or list)(sizes)
    body = b"".join(chunks)
    arrays_at = data_at + len(body)
    n = len(starts)
    extra = struct.pack(f"<{n}I", *starts) + struct.pack(f"<{n}I", *sizes) + struct.pack(f"<{s}H", *[8] * s)
    ifd_at = arrays_at + len(extra)
    where = (273, 279, 278) if unit is None else (324, 325, 322)
    entries = [(256, 4, 1, w), (257, 4, 1, height or h), (258, 3, s, arrays_at + 8 * n if s > 2 else 8),
               (259, 3, 1, 1), (262, 3, 1, 2 if s == 3 else 1), (277, 3, 1, s), (284, 3, 1, planar),
               (where[0], 4, n, arrays_at if n > 1 else starts[0]), (where[1], 4, n, arrays_at + 4 * n if n > 1
                                                                     else sizes[0])]
    entries += [(278, 4, 1, rows)] if unit is None else [(322, 4, 1, unit[0]), (323, 4, 1, unit[1])]
    entries.sort()
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", t, k, c) + (struct.pack("<HH", v, 0) if k == 3 and c == 1 else struct.pack("<I", v))
        for t, k, c, v in entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", ifd_at) + body + extra + ifd


NORMAL = {
    **{f"rgb {c}": (Image.fromarray(RGB), {"compression": c}) for c in
       ("raw", "tiff_lzw", "tiff_deflate", "tiff_adobe_deflate", "packbits", "jpeg")},
    "grey": (Image.fromarray(RGB[..., 0]), {}), "1 bit": (Image.fromarray(RGB[..., 0] > 128), {}),
    "I;16": (Image.fromarray(RGB[..., 0].astype(np.uint16) * 257), {}),
    "CMYK": (Image.fromarray(RGB).convert("CMYK"), {}),
    "RGBA lzw": (Image.fromarray(RGB).convert("RGBA"), {"compression": "tiff_lzw"}),
    "F": (Image.fromarray(RGB[..., 0].astype(np.float32) / 255), {}),
    "BigTIFF": (Image.fromarray(RGB), {"big_tiff": True}),
    "two frames": (Image.fromarray(RGB), {"save_all": True, "append_images": [Image.fromarray(RGB[:10])]}),
}


@pytest.mark.parametrize("strip_size", [65536, 200])  # one strip, or Pillow's many (libtiff's writer)
@pytest.mark.parametrize("name", NORMAL)
def test_every_tiff_pillow_writes_is_accepted(name, strip_size, monkeypatch):
    monkeypatch.setattr(TiffImagePlugin, "STRIP_SIZE", strip_size)
    image, save = NORMAL[name]
    data = _pillow(image, **save)
    assert tiff_cut(data) is None
    if name != "F":  # refused for its value range, after the check
        assert decode_bytes(data, "ok.tif").shape[-2:] == (40, 30)
    open_pil(data, "ok.tif").close()


@pytest.mark.parametrize("kwargs", [dict(rows=7), dict(rows=40), dict(unit=(16, 16)), dict(unit=(16, 48)),
                                    dict(rows=7, planar=2), dict(unit=(16, 16), planar=2)])
def test_complete_hand_made_strips_and_tiles_decode_whole(kwargs):
    data = _made(RGB, **kwargs)
    assert tiff_cut(data) is None
    assert (decode_bytes(data, "made.tif").permute(1, 2, 0).numpy() == RGB).all()


def test_an_uncompressed_unit_counted_past_the_files_end_that_its_rows_stay_within_decodes_whole():
    """Pillow reads an uncompressed strip's rows from its offset, not its count: a writer that counts the last strip
    as full (or more) loses no row by it."""
    for kwargs in (dict(rows=7), dict(rows=40), dict(unit=(16, 16))):
        data = _made(RGB, **kwargs, counts=lambda c: [*c[:-1], c[-1] + 1000])
        assert tiff_cut(data) is None
        assert (decode_bytes(data, "made.tif").permute(1, 2, 0).numpy() == RGB).all()


def _refused(data: bytes, words: str) -> None:
    with pytest.raises(ValueError) as raised:
        decode_bytes(data, "cut.tif")
    message = str(raised.value)
    assert message.startswith("cannot decode image cut.tif: a TIFF whose ") and words in message, message
    assert message.endswith("Pillow would leave the missing rows black); replace or remove it")
    with pytest.raises(ValueError, match="^cannot decode image cut.tif: a TIFF whose "):
        open_pil(data, "cut.tif")


def test_more_rows_than_the_strips_hold_is_refused():
    for data in (_pillow(Image.fromarray(RGB)), _pillow(Image.fromarray(RGB), big_tiff=True)):
        _refused(_set_tag(data, 257, 80), "header declares 80 rows in 2 strips and the file lists 1")  # was 40 black
    _refused(_set_tag(_pillow(Image.fromarray(RGB), compression="tiff_lzw"), 257, 80), "80 rows in 2 strips")
    _refused(_made(RGB, rows=7, drop=2), "header declares 40 rows in 6 strips and the file lists 4")
    _refused(_made(RGB, unit=(16, 16), drop=1), "header declares 40 rows in 6 tiles and the file lists 5")
    _refused(_made(RGB, rows=7, planar=2, drop=1), "in 18 strips and the file lists 17")


def test_a_strip_past_the_end_empty_or_short_is_refused():
    ends = _made(RGB, rows=7, offsets=lambda o: [*o[:-1], o[-1] + 10_000])
    _refused(ends, "strip 6 of 6 ends at byte ")
    lzw = _pillow(Image.fromarray(RGB), compression="tiff_lzw")
    _refused(_set_tag(lzw, 279, len(lzw) + 1000), "strip 1 of 1 ends at byte ")
    _refused(_made(RGB, rows=7, counts=lambda c: [*c[:2], 0, *c[3:]]), "strip 3 of 6 is empty (0 bytes)")
    _refused(_made(RGB, rows=7, counts=lambda c: [*c[:-1], c[-1] - 1]),
             "uncompressed strip 6 of 6 holds 449 bytes of the 450 its rows need")
    _refused(_made(RGB, unit=(16, 16), counts=lambda c: [c[0] - 3, *c[1:]]),
             "uncompressed tile 1 of 6 holds 765 bytes of the 768 its rows need")
