"""A folder's advisory lock: an exclusive ``fcntl.flock`` of a lock file in it, held by the open handle.

The kernel drops it when its holder ends, a kill included, so a stale lock file never blocks. A training run's lock
(``OUT/.lock``), an export's (``DIR/.export.lock``), a study's data build's (``OUT/.data.lock``) and a compose-digits
set's (``.OUT.lock`` beside it) are all this one; each caller words its own refusal. Windows has no flock: there
every folder is as one on a filesystem without it (unlocked, with the caller's warning). A file of the lock's name
that lomar did not write (a user's own ``.lock`` in a folder predict writes into) is refused, never overwritten or
removed: lomar's hold nothing, or its holder's name (:data:`_LOCK_TEXT`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from lomar.checkpoints.io import open_in_place
from lomar.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LockHeld", "take_file_lock", "flock_in_place", "holding_file_lock", "lock_owner"]

# The folders found without flock, each told once in a process: a run's export into its folder, unlocked as the
# run is, would say it again
_TOLD: set[str] = set()

# What a lock file lomar made holds: nothing (made, its holder killed before it wrote, or a full disk), "pid N on
# HOST" (the host name as the system gives it, an empty one or one with spaces too), or a bare PID (an older
# lomar's); anything else is a file of the user's that has the lock's name
_LOCK_TEXT = re.compile(r"(pid \d+ on( [^\n]*)?|\d+)?")
# Stripped from its ends first: a line end, and the zeros a filesystem shows of a write that a power loss or a crash
# of the machine cut off (its size written, its data not), as every lock file written just before it may be
_LOCK_PADDING = " \t\r\n\x00"
_LOCK_MOST = 300  # characters: a host name is at most 255


class LockHeld(Exception):
    """Another process holds the lock; ``owner``: what its holder wrote in the file ("pid N on HOST", or "pid
    unknown")."""

    def __init__(self, owner: str):
        super().__init__(owner)
        self.owner = owner


def flock_in_place(handle: IO, path: Path, shared: bool = False) -> bool:
    """flock ``handle`` (of ``path``) exclusive (``shared``: shared), without waiting; False when the file there is no
    longer it: an export's holder removes its lock file before unlocking, so a lock won on a removed file guards
    nothing. BlockingIOError while another holds it; OSError ENOSYS where the system has no flock (Windows)."""
    if fcntl is None:
        raise OSError(errno.ENOSYS, "this system has no flock")
    fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def take_file_lock(path: Path, wait_s: float = 0.0, on_wait: Callable[[str], None] | None = None,
                   on_unlocked: Callable[[str], None] | None = None) -> IO | None:
    """Lock ``path`` (made, with its folder, if need be) -> its handle, with "pid N on HOST" written in it; closing
    the handle unlocks. Held by another: waits up to ``wait_s``, telling ``on_wait(owner)`` once as it starts, then
    LockHeld. None where the filesystem has no flock (ENOLCK, EOPNOTSUPP, ENOSYS): ``on_unlocked(reason)`` is told
    (the first time for the folder in this process) and a lock file it made is removed (one found there is left).
    OSError where the folder cannot be made or the file opened (UsageError: a link or a pipe there, or a file that
    holds other than :data:`_LOCK_TEXT`, which lomar did not write and leaves as it is). Another user's
    lock file (0644) is locked read-only, its holder's name left as it is: flock needs no write access, so an export
    into a shared folder waits for theirs as for its own user's."""
    deadline, said = time.monotonic() + wait_s, False
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)  # not retried: a removed working folder's ENOENT recurs
        made = not os.path.lexists(path)
        try:
            handle = _open_lock(path)
        except FileNotFoundError:  # the folder removed by a holder leaving it, or another user's file gone between
            continue  # its two opens: make them anew
        try:
            got = flock_in_place(handle, path)
        except BlockingIOError:
            owner = lock_owner(handle)
            if time.monotonic() > deadline:
                raise LockHeld(owner) from None
            if not said and on_wait is not None:
                on_wait(owner)
            said = True
            time.sleep(0.05)
            continue
        except OSError as exc:  # ENOLCK, EOPNOTSUPP, ENOSYS: a filesystem (or system) without flock
            # One found there may be held from a machine whose mount has flock (an NFS client mounted otherwise):
            # removed, a third process there would lock a new one beside it
            if made:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            handle.close()
            if on_unlocked is not None and (folder := os.path.realpath(path.parent)) not in _TOLD:
                _TOLD.add(folder)
                on_unlocked(exc.strerror or str(exc))
            return None
        if got:
            _check_lomars(handle, path)
            if handle.writable():
                with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, its holder unnamed
                    os.ftruncate(handle.fileno(), 0)  # unbuffered: nothing left to fail at close
                    os.write(handle.fileno(), f"pid {os.getpid()} on {socket.gethostname()}".encode())
            return handle
        handle.close()  # locked a file its holder had removed: open the one there now


@contextlib.contextmanager
def holding_file_lock(path: Path, wait_s: float, refusal: Callable[[str], Exception],
                      on_wait: Callable[[str], None] | None = None, on_unlocked: Callable[[str], None] | None = None,
                      unopened_ok: bool = False) -> Iterator[bool]:
    """Hold ``path``'s lock (:func:`take_file_lock`) for the block; yields whether it is held (not where the filesystem
    has no flock: ``on_unlocked`` is told). Held by another past ``wait_s``: ``refusal(owner)`` is raised.
    ``unopened_ok``: a lock file that cannot be made or opened is as no flock, unheld and untold, not OSError. The
    lock file is removed before it is unlocked, so a waiter finds it gone and opens anew, not the removed one."""
    try:
        handle = take_file_lock(path, wait_s, on_wait, on_unlocked)
    except LockHeld as held:
        raise refusal(held.owner) from None
    except OSError:
        if not unopened_ok:
            raise
        handle = None
    try:
        yield handle is not None
    finally:
        if handle is not None:
            with contextlib.suppress(OSError):  # another user's file in a sticky folder stays: held by none, it is free
                path.unlink(missing_ok=True)
            handle.close()


def lock_owner(handle: IO) -> str:
    """What the lock's holder wrote (a bare PID as "pid N"), else "pid unknown"; closes ``handle``."""
    with handle:
        handle.seek(0)
        # what lomar writes is one short line; a planted file's rest must not reach a one-line message
        owner = " ".join(handle.read(200).split()) if handle.readable() else ""
    return f"pid {owner}" if owner.isdigit() else owner[:80] or "pid unknown"


def _check_lomars(handle: IO, path: Path) -> None:
    """UsageError (``handle`` closed) where the locked file ``path`` holds other than a lomar lock's text: a user's
    own file of that name, which writing the holder's name would overwrite and an unlock remove."""
    handle.seek(0)
    text = handle.read(_LOCK_MOST + 1) if handle.readable() else ""
    if len(text) <= _LOCK_MOST and _LOCK_TEXT.fullmatch(text.strip(_LOCK_PADDING)):
        return
    handle.close()
    first = " ".join(text.split())
    shown = f"{first[:40]}..." if len(first) > 40 else first
    raise UsageError(f"{path} is not a lomar lock file (it holds {shown!r}), and lomar locks its folder with a file "
                     f"of that name; move it elsewhere, or use another folder")


def _open_lock(path: Path) -> IO:
    """The lock file, to write the holder's name in; read-only where it is another user's."""
    try:
        return open_in_place(path, "a+", errors="replace")
    except PermissionError:
        if not path.exists():  # the folder cannot be written
            raise
        return open_in_place(path, errors="replace")
