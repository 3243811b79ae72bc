"""The folder lock where the system has no flock at all (Windows: no fcntl module)."""

from __future__ import annotations

import os

from lomar.checkpoints import file_lock
from lomar.checkpoints.export_leftovers import EXPORT_LOCK, export_running
from lomar.checkpoints.file_lock import take_file_lock


def test_a_system_without_fcntl_locks_as_a_filesystem_without_flock_does(tmp_path, monkeypatch):
    """Where ``import fcntl`` fails, every lock is one a filesystem without flock refuses: not taken, said once, no
    lock file left behind; whether an export runs cannot be told (the leftovers' PIDs then judge them)."""
    monkeypatch.setattr(file_lock, "fcntl", None)
    told: list[str] = []
    lock = tmp_path / "run" / ".lock"
    assert take_file_lock(lock, on_unlocked=told.append) is None  # not AttributeError on fcntl.LOCK_EX
    assert told == ["this system has no flock"] and not lock.exists()
    (tmp_path / EXPORT_LOCK).write_text("pid 1")
    assert not export_running(tmp_path)


def test_on_windows_a_leftovers_pid_is_taken_as_alive_without_signalling_it(monkeypatch):
    """Without flock (Windows) a leftover's PID judges it; os.kill(pid, 0) asks about a process on POSIX, but on
    Windows signal 0 is CTRL_C_EVENT: a console Ctrl-C, no query. There the PID is taken as a live export's (its files
    are kept), unprobed."""
    from lomar.checkpoints import export_leftovers

    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(os, "name", "nt")
    alive = export_leftovers._alive(4242)
    monkeypatch.undo()
    assert alive and sent == []  # no os.kill(4242, 0): Windows carries it out as a console Ctrl-C
