"""Where --resume auto resumes (lomar.train.run_resume): the newest intact checkpoint, a step checkpoint newer than
last.pt, one rewritten since the settings read it; and a failed load named by what differs."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import _state
from lomar.checkpoints.io import atomic_save
from lomar.train.run_resume import find_resume_point, read_resume_point, resume_point


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    for step in (3, 6, 9):
        atomic_save(_state(step), tmp_path / f"checkpoint-{step:06d}.pt")
    (tmp_path / "checkpoint-000012.pt").write_bytes(b"truncated by a full disk")
    found = find_resume_point(tmp_path)
    assert found.path.name == "checkpoint-000009.pt"
    text = " | ".join(found.notes)
    assert "last.pt is missing" in text and "checkpoint-000012.pt cannot be read" in text
    assert "checkpoint-000009.pt" in text
    atomic_save(_state(12), tmp_path / "last.pt")
    found = find_resume_point(tmp_path)
    assert (found.path, found.notes) == (tmp_path / "last.pt", [])
    found = find_resume_point(tmp_path / "nothing")
    assert (found.path, found.notes) == (None, [])


def test_resume_auto_takes_a_step_checkpoint_newer_than_last_pt(tmp_path):
    """A run killed between writing checkpoint-N.pt and last.pt leaves last.pt a save behind."""
    atomic_save(_state(10), tmp_path / "last.pt")
    atomic_save(_state(10), tmp_path / "checkpoint-000010.pt")
    atomic_save(_state(15), tmp_path / "checkpoint-000015.pt")
    found = find_resume_point(tmp_path)
    assert found.path.name == "checkpoint-000015.pt"
    assert found.notes[0] == f"{tmp_path / 'last.pt'} is at step 10, behind checkpoint-000015.pt"


def test_resume_auto_under_the_lock_takes_a_newer_checkpoint_the_folders_time_does_not_show(tmp_path):
    """The settings read last.pt; before the run's lock a run killed between its two writes left a newer
    checkpoint-N.pt, on a filesystem whose clock (1-2 s) or cached attributes (NFS) show the folder unchanged."""
    atomic_save(_state(2), tmp_path / "last.pt")
    read = find_resume_point(tmp_path)
    held = tmp_path.stat()
    atomic_save(_state(4), tmp_path / "checkpoint-000004.pt")
    os.utime(tmp_path, ns=(held.st_atime_ns, held.st_mtime_ns))
    point = resume_point("auto", tmp_path, False, read)
    assert point.path.name == "checkpoint-000004.pt" and point.step == 4


def test_a_checkpoint_rewritten_in_place_since_the_settings_read_it_is_read_again(tmp_path):
    """rsync --inplace -t: the same inode, size and mtime, but another state (its ctime tells)."""
    path = tmp_path / "last.pt"
    atomic_save(_state(2), path)
    read = read_resume_point(path)
    before = path.stat()
    atomic_save(_state(3), tmp_path / "other.pt")
    data = (tmp_path / "other.pt").read_bytes()
    assert len(data) == before.st_size
    with open(path, "r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    while path.stat().st_ctime_ns == before.st_ctime_ns:  # a coarse clock: until it ticks
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert resume_point(str(path), tmp_path, False, read).step == 3


def test_a_resume_mismatch_names_what_differs():
    """torch's first line of a failed load_state_dict is a header: the one-line error takes the difference."""
    from lomar.checkpoints.io import mismatch

    with pytest.raises(RuntimeError) as caught:
        torch.nn.Linear(4, 3).load_state_dict(torch.nn.Linear(4, 2).state_dict())
    assert mismatch(caught.value).startswith("size mismatch for weight: copying a param with shape")
    assert mismatch(KeyError("optimizer")) == "'optimizer'" and mismatch(ValueError()) == "ValueError"
