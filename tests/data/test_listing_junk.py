"""How image lists are read: .txt lists written by find over copied disks, and their paths' normal form."""

import logging
import random
from pathlib import Path

from lomar.data.folder import build_image_list
from lomar.data.pathtable import join_text


def test_join_text_gives_the_strings_path_objects_give():
    rng = random.Random(0)
    pieces = ["a", "b", ".", "/", "..", " ", "._x", "é"]
    for folder in (".", "/", "//", "/x/y", "rel", "rel/sub", "//net"):
        for _ in range(2000):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
            expected = str(Path(text)) if Path(text).is_absolute() else str(Path(folder) / text)
            assert join_text(folder, text) == expected, (folder, text)


def test_a_find_written_list_leaves_out_macos_metadata_and_thumbnails(tmp_path, caplog):
    (tmp_path / "a.jpg").write_bytes(b"x")
    listing = tmp_path / "list.txt"  # find . -name '*.jpg' on a photo folder copied from a Mac to a Synology NAS
    listing.write_text("./a.jpg\n./._a.jpg\n./sub/._b.jpg\n./@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg\n./__MACOSX/._c.jpg\n"
                       "./my._photo.jpg\n./x@eaDir/d.jpg\n")
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        images = build_image_list(listing)
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["a.jpg", "my._photo.jpg", "x@eaDir/d.jpg"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{listing}: 4 line(s) name macOS metadata files (._NAME) or thumbnails (@eaDir, __MACOSX), e.g. "
        f"{tmp_path / '._a.jpg'}; left out, as a folder search leaves them out"]
    listing.write_text("./a.jpg\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert list(build_image_list(listing)) == [tmp_path / "a.jpg"] and not caplog.records
