"""A test-set JPEG written by two commands at once (two benchmarks making one set, on machines sharing the folder)."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from lomar.bench.testset import _write_one, make_test_set
from lomar.data.demo_images import demo_image_paths


def test_two_writers_of_one_pid_each_write_and_rename_their_own_temporary(tmp_path, monkeypatch):
    """A second writer, writing as the first renames its temporary, leaves the first's temporary alone: each writes
    and renames its own."""
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    dst, rename, seen = tmp_path / "imagenet-00000.jpg", os.replace, []
    job = (str(demo_image_paths()[0]), str(dst), (64, 48), 90, 0)

    def rename_after_another_writer(src, target):
        if not seen:
            seen.append(src)
            assert _write_one(job) == str(dst)
        rename(src, target)

    monkeypatch.setattr(os, "replace", rename_after_another_writer)
    assert _write_one(job) == str(dst)  # not FileNotFoundError: its temporary is its own
    assert [p.name for p in tmp_path.iterdir()] == [dst.name]
    with Image.open(dst) as img:
        assert img.size == (64, 48)


def test_a_test_set_file_has_the_permissions_the_umask_gives(tmp_path):
    """A JPEG of the set is written as any file the user makes: the umask's permissions (0640 under 027), not a mode
    of lomar's choosing (mkstemp's 0600 set to 0644)."""
    dst = tmp_path / "imagenet-00000.jpg"
    umask = os.umask(0o027)
    try:
        _write_one((str(demo_image_paths()[0]), str(dst), (64, 48), 90, 0))
    finally:
        os.umask(umask)
    assert oct(dst.stat().st_mode & 0o777) == "0o640"


def test_a_killed_writes_temporary_is_named_as_one_with_its_fix(tmp_path):
    """A make_test_set killed midway leaves its own temporary, which no later command may take for dead (its writer
    may be on another machine): the refusal names it as a test-set temporary to delete, not as a stranger's file in
    a folder to give up."""
    leftover = f".imagenet-00003.jpg.tmp-4242-{'0a' * 8}"
    (tmp_path / leftover).write_bytes(b"half")
    with pytest.raises(ValueError, match=f"{tmp_path} holds {leftover}, a test-set file another command is writing "
                                         f"or a killed one left; delete it once"):
        make_test_set(tmp_path, "imagenet", count=1)


def test_a_test_set_file_is_on_disk_before_it_takes_its_name(tmp_path, monkeypatch):
    """The rename can reach the disk before the data does: after a power loss the final name would hold an empty
    file, which a later make_test_set reuses as it stands. The whole JPEG is fsynced before the rename."""
    dst, fsync, rename, synced = tmp_path / "imagenet-00000.jpg", os.fsync, os.replace, {}

    def recorded_fsync(fd):
        fsync(fd)
        synced[os.fstat(fd).st_ino] = os.fstat(fd).st_size

    def rename_if_synced(src, target):
        status = os.stat(src)
        assert synced.get(status.st_ino) == status.st_size > 0, "renamed before its data was fsynced"
        rename(src, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", rename_if_synced)
    assert _write_one((str(demo_image_paths()[0]), str(dst), (64, 48), 90, 0)) == str(dst)
    assert dst.stat().st_size == synced[dst.stat().st_ino]
