"""Which files of a lock's name are lomar's own (taken over when no process holds them) and which are a user's."""

from __future__ import annotations

import os
import socket

import pytest

from lomar.checkpoints.file_lock import take_file_lock
from lomar.errors import UsageError


@pytest.mark.parametrize("text", ["\x00" * 21, "pid 4242 on \x00\x00\x00", "pid 4242 on build box", "pid 4242 on "])
def test_a_lock_file_a_crash_zeroed_or_of_any_host_name_is_taken_over(tmp_path, text):
    """A power loss just after a lock's name was written may leave its size and zeros for its bytes; a host name may
    hold a space or be empty. Each is a killed run's lock, taken over, not a user's file that blocks the rerun."""
    lock = tmp_path / ".lock"
    lock.write_text(text)
    with take_file_lock(lock):
        assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"


def test_two_lines_are_no_lock_of_lomars(tmp_path):
    """lomar writes one line: a second one is the user's, refused and kept."""
    lock = tmp_path / ".lock"
    lock.write_text("pid 4242 on host\nmy notes")
    with pytest.raises(UsageError, match="is not a lomar lock file"):
        take_file_lock(lock)
    assert lock.read_text() == "pid 4242 on host\nmy notes"
