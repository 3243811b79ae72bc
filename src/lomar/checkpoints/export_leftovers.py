"""An export folder's lock, and what a write_export killed midway leaves there: the files it set aside
(``.NAME.old-TAG``), those it was renaming in (``.NAME.new-TAG``) and their temporaries. TAG is the writer's
:func:`writer_tag`, HOST-PID-TOKEN. A reader names them; the next export removes them.

A write_export holds :func:`export_lock` for its whole write and swap, so two exports into one folder take turns. It is
an advisory ``fcntl.flock`` that the kernel drops when its holder ends, a kill included: a leftover is stale when no
export holds the lock, which also judges a writer on another machine where the share honours flock (NFS does), whose
PID means nothing here. Where no lock is to be had (a filesystem without flock: the export warns and goes on unlocked;
files of an export that took none) a leftover is stale when its TAG names this machine and a PID that is no live
process here; another machine's is kept, as whether its writer lives cannot be told from here. An older lomar's
leftover, named ``.NAME.old-PID`` / ``.NAME.new-PID``, is taken for this machine's. Windows has neither
flock nor os.kill's probe: there a leftover is kept and not named (lomar is not supported there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from lomar.checkpoints.file_lock import flock_in_place, holding_file_lock, lock_owner
from lomar.checkpoints.file_names import CONFIG_NAME
from lomar.checkpoints.io import open_in_place
from lomar.checkpoints.own_names import TEMPORARY_SUFFIX
from lomar.checkpoints.run_folder import model_file
from lomar.errors import UsageError

__all__ = ["stale_leftovers", "interrupted_export", "export_set_aside", "readable_file", "export_lock",
           "export_running", "is_export_file", "writer_tag", "EXPORT_LOCK", "LOCK_WAIT_S"]

# ".config.json.old-TAG", ".model.safetensors.new-TAG" and atomic_write's "..config.json.new-TAG.tmp-PID-TOKEN"; or
# an older lomar's, named by the PID alone (".config.json.old-PID", "..config.json.new-PID.tmp-PID"), written on this
# machine as far as can be told: a folder upgraded after a killed export still has its set-aside files named
_LEFTOVER = re.compile(r"\.\.?(?P<name>.+?)\.(?P<kind>old|new)-"
                       r"(?:(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{16}|(?P<pid_only>\d+))"
                       rf"(?:{TEMPORARY_SUFFIX}|\.tmp-\d+)?")
# Hidden, and there only while an export writes (or after one was killed): no reader of the folder takes it
EXPORT_LOCK = ".export.lock"
# How long an export waits for another one's write and swap (seconds of disk writing, not of training)
LOCK_WAIT_S = 120.0
log = logging.getLogger("lomar.checkpoints")
_HELD = threading.local()  # folder -> locked, of this thread's holds: write_export inside a caller's hold


def writer_tag() -> str:
    """HOST-PID-TOKEN, for the names of this writer's files in an export folder: a folder shared by machines (a home on
    NFS) sees one PID in two of them, so the TOKEN (16 random hex digits) keeps their files apart and the HOST says
    where the PID can be probed. HOST: the host name, '-' and any character outside [A-Za-z0-9_.] as '_'."""
    return f"{_host()}-{os.getpid()}-{secrets.token_hex(8)}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "_"


def _alive(pid: int) -> bool:
    # Windows has no probe: its signal 0 is CTRL_C_EVENT, a console Ctrl-C (GenerateConsoleCtrlEvent), not a query
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # no process has such an id
        return False
    return True


@contextlib.contextmanager
def export_lock(folder: Path, wait_s: float | None = None) -> Iterator[bool]:
    """Hold ``folder``'s export lock (made if need be) for the block; yields whether it is held. Waits up to
    ``wait_s`` (:data:`LOCK_WAIT_S`) for another export's, then UsageError naming the folder. Not held: the folder
    cannot be made or written (the export's own write then says why), or its filesystem has no flock (a warning)."""
    held, key = _HELD.__dict__.setdefault("folders", {}), os.path.realpath(folder)
    if key in held:  # inside this thread's own hold, locked or not: no second try, no second warning
        yield held[key]
        return
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s

    def waiting(owner: str) -> None:
        log.warning("%s is being written by another export (%s): waiting for it, up to %g s", folder, owner, wait_s)

    def unlocked(reason: str) -> None:
        log.warning("%s: no file lock there (%s); exporting unlocked: run no other export into it meanwhile", folder,
                    reason)

    def refusal(owner: str) -> UsageError:
        return UsageError(f"{folder} is being written by another export ({owner}), waited for {wait_s:g} s; "
                          f"export again once it ends, or export to another folder")

    # unopened_ok: the folder cannot be made or written, and the export's own write says why
    with holding_file_lock(folder / EXPORT_LOCK, wait_s, refusal, waiting, unlocked, unopened_ok=True) as locked:
        held[key] = locked
        try:
            yield locked
        finally:
            del held[key]


def _lock_state(folder: Path) -> bool | None:
    """Whether an export holds ``folder``'s lock now; None where that cannot be told (no lock file, no flock)."""
    return None if (holder := _lock_holder(folder)) is None else bool(holder)


def _lock_holder(folder: Path) -> str | None:
    """What the export holding ``folder``'s lock wrote in it ("pid N on HOST"); '' where none holds it; None where
    that cannot be told (no lock file, no flock)."""
    try:
        with open_in_place(folder / EXPORT_LOCK) as handle:
            try:
                return "" if flock_in_place(handle, folder / EXPORT_LOCK, shared=True) else None
            except BlockingIOError:
                return lock_owner(handle)
    except (OSError, UsageError):
        return None


def export_running(folder: Path) -> bool:
    """Whether an export holds ``folder``'s lock now (False where no lock file or no flock tells it)."""
    return _lock_state(folder) is True


def is_export_file(name: str) -> bool:
    """Whether ``name`` is one an export writes (config.json, a safetensors file), its temporaries included."""
    return CONFIG_NAME in name or ".safetensors" in name


def stale_leftovers(folder: Path, locked: bool = False) -> list[tuple[Path, str]]:
    """Each leftover of a dead write_export in ``folder`` (of config.json or a safetensors file), with its kind: 'old'
    (the previous export's file) or 'new'. ``locked``: the caller holds the folder's export lock, so all are. Where
    no lock tells, only those whose tag names this machine and a PID that is no live process."""
    held = False if locked else _lock_state(folder)
    found = []
    for path, match in _leftovers(folder) if not held else ():
        here, pid = (match["host"] or _host()) == _host(), int(match["pid"] or match["pid_only"])
        if held is False or here and not _alive(pid):
            found.append((path, match["kind"]))
    return found


def _leftovers(folder: Path) -> list[tuple[Path, re.Match]]:
    """Each file a write_export leaves in ``folder`` (of config.json or a safetensors file, its writer alive or not),
    with its name's parts (:data:`_LEFTOVER`)."""
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        match = _LEFTOVER.fullmatch(path.name)
        if match and (match["name"] == CONFIG_NAME or match["name"].endswith(".safetensors")) and path.is_file():
            found.append((path, match))
    return found


def interrupted_export(folder: Path) -> str:
    """Words for a folder without config.json that holds a dead export's set-aside files, else ''."""
    old = [path for path, kind in stale_leftovers(folder) if kind == "old"]
    if not old:
        return ""
    names = ", ".join(_LEFTOVER.fullmatch(path.name)["name"] for path in old)
    return (f"an export into it was interrupted: its previous files are {', '.join(path.name for path in old)} "
            f"(export again, or rename them back to {names}); ")


def _set_aside(folder: Path) -> list[tuple[Path, re.Match]]:
    """The export files (config.json, a safetensors file) a write_export set aside in ``folder``, ``.NAME.old-TAG``,
    whether their writer lives or not, with their names' parts."""
    return [(path, match) for path, match in _leftovers(folder) if match["kind"] == "old"]


def export_set_aside(folder: Path) -> str:
    """Words for a folder without config.json whose export is set aside, saying what to do: :func:`interrupted_export`'s
    for a dead writer's; to wait for one known to run (its lock held, or its PID alive here), whose files must not be
    renamed under it; to wait, or rename them back if it was interrupted, for another machine's that no lock judges.
    '' where none is set aside."""
    if words := interrupted_export(folder):
        return words
    if not (aside := _set_aside(folder)):
        return ""
    files, tags = ", ".join(path.name for path, _ in aside), [tag for _, tag in aside]
    if holder := _lock_holder(folder):
        return (f"an export into it is under way ({holder}, holding its lock {folder / EXPORT_LOCK}): its previous "
                f"files are set aside as {files} (read it once that export ends); ")
    hosts = sorted({tag["host"] for tag in tags if tag["host"] and tag["host"] != _host()})
    if not hosts:  # no lock tells, and each writer's PID lives here (a dead one's are interrupted_export's)
        pids = ", ".join(sorted({tag["pid"] or tag["pid_only"] for tag in tags}))
        return (f"an export into it is under way (pid {pids} on this machine): its previous files are set aside as "
                f"{files} (read it once that export ends); ")
    names = ", ".join(tag["name"] for tag in tags)
    return (f"an export into it from {', '.join(hosts)} set its previous files aside as {files}, and no lock tells "
            f"here whether it still runs (read it once that export ends, or, if it was interrupted, rename them back "
            f"to {names}); ")


def readable_file(path: Path) -> Path:
    """What every reader of ``path`` reads, the one rule of :func:`lomar.checkpoints.formats.read` (so of
    :func:`lomar.load_model`, ``encoder_weights``, ``lomar export``, ``lomar predict``, ``lomar.dense.load_encoder``
    and ``--pretrained`` of knn, linprobe, finetune, detect and segment): a run folder without an export through its
    best.pt, else last.pt (:func:`~lomar.checkpoints.run_folder.model_file`), except one whose export is set aside
    (:func:`export_set_aside`: interrupted, or under way), given back as the folder, which read() refuses naming the
    set-aside export (its reader wants that export, not a checkpoint); anything else as it is."""
    if path.is_dir() and not (path / CONFIG_NAME).exists() and _set_aside(path):
        return path
    return model_file(path)
