"""The digits preset's data, built by two commands at once (two studies side by side, on one machine or two sharing
the folder)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import sklearn.datasets
from sklearn.utils import Bunch

from lomar.checkpoints import file_lock
from lomar.cli.study import presets
from lomar.cli.study.presets import digits_data
from lomar.errors import UsageError


def _few_digits(monkeypatch) -> None:
    """sklearn's digits cut to their first 40 images: a build as quick as the tests need."""
    digits = sklearn.datasets.load_digits()
    monkeypatch.setattr(sklearn.datasets, "load_digits",
                        lambda: Bunch(images=digits.images[:40], target=digits.target[:40]))


def test_two_builds_of_one_pid_at_once_each_use_their_own_folder(tmp_path, monkeypatch):
    """Two builds of one PID (on two machines sharing the folder, without flock) each build in a folder of its own: a
    second build starting as the first renames its folder in leaves the first's folder alone, and takes the data the
    first renamed in as its own."""
    _few_digits(monkeypatch)
    monkeypatch.setattr(os, "getpid", lambda: 4242)  # the other machine's command has this machine's PID
    monkeypatch.setattr(file_lock, "take_file_lock", lambda *args: None)  # no flock there: builds run side by side
    root, rename, seen = tmp_path / "data" / "digits", os.replace, []

    def rename_after_another_build(src, dst):
        if not seen:
            seen.append(src)
            assert digits_data(root) == root
        rename(src, dst)

    monkeypatch.setattr(os, "replace", rename_after_another_build)
    assert digits_data(root) == root  # not FileNotFoundError: its build folder is its own
    assert sorted(p.name for p in root.parent.iterdir()) == ["digits"]  # no build's folder left
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]
    assert sum(1 for _ in root.rglob("*.png")) == 40


def test_the_built_folder_has_the_permissions_the_umask_gives(tmp_path, monkeypatch):
    """The data folder is the build's folder renamed: one made by tempfile.mkdtemp is the owner's alone (0700); one
    made by mkdir follows the umask, as every folder inside it does."""
    _few_digits(monkeypatch)
    umask = os.umask(0o022)
    try:
        root = digits_data(tmp_path / "digits")
    finally:
        os.umask(umask)
    assert oct(root.stat().st_mode & 0o777) == oct((root / "train").stat().st_mode & 0o777) == "0o755"


def test_a_folder_in_the_datas_place_that_is_not_the_data_is_named_with_the_fix(tmp_path, monkeypatch):
    """OUT/data holding files of its own (no train/ and val/): the build cannot be renamed in, and the user is told
    which folder is in the way, not given the rename's 'Directory not empty' with the build's hidden name."""
    _few_digits(monkeypatch)
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(UsageError) as raised:
        digits_data(root)
    assert str(raised.value) == (f"{root} is there and is not the digits data (no train/ and val/ in it); move it "
                                 f"away or delete it, or pass another --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the build's own folder is removed
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]


def test_a_killed_builds_folder_is_removed_by_the_next_build_holding_the_lock(tmp_path, monkeypatch):
    """A build killed midway leaves its hidden .data.tmp-PID-TOKEN folder; no build holds the lock while none runs, so
    the next build, holding it, removes every such folder. A file or folder of another name stays."""
    _few_digits(monkeypatch)
    root = tmp_path / "data"
    killed = tmp_path / f".data.tmp-4242-{'0a' * 8}"
    (killed / "train" / "3").mkdir(parents=True)
    (killed / "train" / "3" / "0001.png").write_bytes(b"half")
    (tmp_path / ".data.tmp-mine").mkdir()
    assert digits_data(root) == root
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.tmp-mine", "data"]


def test_without_flock_a_killed_builds_folder_stays(tmp_path, monkeypatch):
    """Where the filesystem has no flock, a build folder may be a live build's on another machine sharing the folder,
    whose PID means nothing here: it stays."""
    _few_digits(monkeypatch)
    monkeypatch.setattr(file_lock, "take_file_lock", lambda *args: None)
    root, killed = tmp_path / "data", tmp_path / f".data.tmp-4242-{'0a' * 8}"
    killed.mkdir()
    assert digits_data(root) == root
    assert sorted(p.name for p in tmp_path.iterdir()) == [killed.name, "data"]


def test_without_flock_the_build_says_it_goes_unlocked(tmp_path, monkeypatch, caplog):
    """Where no flock is to be had the build goes on unlocked and says so, as a run and an export there do: a killed
    build's hidden folder then stays for the user to delete. No lock file is left behind."""
    _few_digits(monkeypatch)
    monkeypatch.setattr(file_lock, "fcntl", None)  # the system without flock: take_file_lock's ENOSYS
    root = tmp_path / "data"
    with caplog.at_level(logging.WARNING, logger="lomar.train"):
        assert digits_data(root) == root
    assert [r.getMessage() for r in caplog.records] == [
        f"{root}: no file lock there (this system has no flock); building unlocked: a build killed midway leaves its "
        f"hidden .data.tmp-* folder beside it, to delete once no study builds there"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_build_waits_for_another_builds_lock_and_takes_its_data(tmp_path, monkeypatch):
    """Two studies into one folder take turns: the second waits for the first's lock, then finds the data built."""
    _few_digits(monkeypatch)
    root = tmp_path / "data"
    handle = file_lock.take_file_lock(tmp_path / ".data.lock")

    def the_other_build_ends():
        time.sleep(0.3)
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
        handle.close()

    def built(*args):
        raise AssertionError("built again, where the other build's data was there")

    monkeypatch.setattr(presets, "_build_digits", built)
    other = threading.Thread(target=the_other_build_ends)
    other.start()
    try:
        assert digits_data(root) == root
    finally:
        other.join()
    assert [p.name for p in (root / "train").iterdir()] == []
