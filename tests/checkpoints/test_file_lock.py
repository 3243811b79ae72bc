"""The folder lock where the system has no flock at all (Windows: no fcntl module)."""

from __future__ import annotations

from lomar.checkpoints import file_lock
from lomar.checkpoints.export_leftovers import EXPORT_LOCK, export_running
from lomar.checkpoints.file_lock import take_file_lock


def test_a_system_without_fcntl_locks_as_a_filesystem_without_flock_does(tmp_path, monkeypatch):
    """Where ``import fcntl`` fails, every lock is one a filesystem without flock refuses: not taken, said once, no
    lock file left behind; whether an export runs cannot be told (the leftovers' PIDs then judge them)."""
    monkeypatch.setattr(file_lock, "fcntl", None)
    told: list[str] = []
    lock = tmp_path / "run" / ".lock"
    assert take_file_lock(lock, on_unlocked=told.append) is None  # old code: AttributeError on fcntl.LOCK_EX
    assert told == ["this system has no flock"] and not lock.exists()
    (tmp_path / EXPORT_LOCK).write_text("pid 1")
    assert not export_running(tmp_path)
