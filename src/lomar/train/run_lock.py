"""The lock a run holds on its folder for its life: a second run into the same folder refuses at once."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from pathlib import Path

from lomar.checkpoints.file_lock import LockHeld, take_file_lock
from lomar.errors import UsageError
from lomar.train.setting_names import as_given

__all__ = ["RunLock", "holds_run_lock"]

log = logging.getLogger("lomar.train")


_HELD_LOCKS: dict[int, str] = {}  # file descriptor -> folder (its real path), of the run locks this process holds


def _drop_run_locks() -> None:
    """In a forked child (a loader worker), /dev/null in their place: a killed run frees its folder at once."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in _HELD_LOCKS:
        os.dup2(null, fd)
    os.close(null)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):  # Windows forks nothing (and has no flock to hold)
    os.register_at_fork(after_in_child=_drop_run_locks)


def holds_run_lock(out: str | Path) -> bool:
    """Whether this process holds ``out``'s run lock: an flock taken, so no other run (on another machine sharing the
    folder too, where the share honours flock) writes there. False where the run went on unlocked (no flock)."""
    return os.path.realpath(out) in _HELD_LOCKS.values()


class RunLock:
    """An advisory ``fcntl.flock`` on ``OUT/.lock`` (:func:`take_file_lock`), held for the run's life.

    A second run into the same folder refuses at once. The kernel drops the lock when the
    process ends, crash or ``kill -9`` included, so a stale lock file never blocks a rerun;
    forked children (loader workers) do not hold it. On a filesystem without flock the run
    goes on unlocked, with a warning.
    """

    def __init__(self, out: Path, source: str | None = None):  # source: the settings file that gave out, if one did
        self.out, self.handle, self.created, self.taken = Path(out), None, False, False
        self.given = as_given("out", str(out), source)  # 'out: r1 in my.yaml', else '--out r1'

    def acquire(self, warn: bool = True) -> RunLock:
        """Lock the folder (made if need be); ``warn``: say so where it cannot be locked (no flock there)."""
        self.created, lock = not self.out.exists(), self.out / ".lock"
        try:
            handle = take_file_lock(lock, on_unlocked=self._unlocked if warn else None)
            if handle is not None and not handle.writable():  # another user's lock file, which cannot name this run
                handle.close()
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(lock))
        except LockHeld as held:
            owner = held.owner.removesuffix(f" on {socket.gethostname()}")  # a PID of this machine, as ps shows it
            raise UsageError(f"{self.given} is in use by another run ({owner}); wait for it to end "
                             f"or pass another --out") from None
        except OSError as exc:
            # a lock file there that this user cannot open for writing; else the folder's error
            if isinstance(exc, PermissionError) and os.fspath(exc.filename or "") == str(lock) and \
                    os.path.lexists(lock):
                raise UsageError(f"{self.given}: {lock} is another user's lock file, which this run cannot write its "
                                 f"name in ({exc.strerror}); have it removed, or pass another --out") from None
            raise UsageError(f"{self.given}: {exc.strerror or exc}; pass a folder you can write to") from None
        self.handle, self.taken = handle, True
        if handle is not None:
            _HELD_LOCKS[handle.fileno()] = os.path.realpath(self.out)
        return self

    def _unlocked(self, reason: str) -> None:
        log.warning("%s: no file lock there (%s); the folder is not locked against a second run: start no "
                    "other run into it meanwhile", self.given, reason)

    def release(self, remove_if_empty: bool = False) -> None:
        """Unlock; ``remove_if_empty``: also remove the folder if this run created it and
        wrote nothing (a set-up failure leaves no empty run folder behind)."""
        if not self.taken:
            return
        if remove_if_empty and self.created and {p.name for p in self.out.iterdir()} <= {".lock"}:
            (self.out / ".lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.out.rmdir()
        if self.handle is not None:
            _HELD_LOCKS.pop(self.handle.fileno(), None)
            self.handle.close()
        self.handle, self.taken = None, False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release(remove_if_empty=exc[0] is not None)
