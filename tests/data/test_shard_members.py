"""What a whole pass over a tar shard counted is kept only for the same, unchanged file."""

import io
import os
import random
import tarfile
import time

from lomar.data.shard_members import drawn_members, scanned_count


def _write(path, names: list[str]) -> None:
    with open(path, "r+b" if path.exists() else "wb") as file:  # in place: the same inode
        with tarfile.open(fileobj=file, mode="w") as archive:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = 4
                archive.addfile(info, io.BytesIO(b"abcd"))


def test_a_shard_rewritten_in_place_with_its_size_and_mtime_restored_is_counted_again(tmp_path):
    """Keyed by device, inode, size and mtime, a shard rewritten in place to the same size by a tool that sets its
    mtime back (rsync --inplace -t, cp -p onto it) gave the count of the members it held before."""
    shard = tmp_path / "s.tar"
    _write(shard, ["a.jpg", "b.jpg"])
    drawn_members(shard, 0, random.Random(0))  # a whole clean pass: 2 image members
    before = os.stat(shard)
    time.sleep(0.05)  # past the kernel clock's tick, so the rewrite's ctime differs
    _write(shard, ["a.jpg", "b.txt"])
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(shard)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert scanned_count(shard, []) is None  # not 2, the members it held before
    drawn_members(shard, 0, random.Random(0))
    assert scanned_count(shard, []) == 1
