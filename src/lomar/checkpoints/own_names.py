"""A writer's own temporary name beside the file or folder it writes, ``.NAME.tmp-PID-TOKEN``: the PID names the
writer, the random TOKEN (16 hex digits) keeps it apart from any other, on machines sharing a folder (a home on NFS)
that have PIDs in common too. Made with O_EXCL / mkdir, so a file, folder or link already of that name is never opened,
written or removed: the writer removes only what it made. Torch-free: the test-set maker writes through it."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

__all__ = ["own_temporary", "own_folder", "made_beside", "made_beside_each", "remove_made_beside", "TEMPORARY_SUFFIX"]

T = TypeVar("T")
# What follows ".NAME" in a temporary's name, as a regular expression: how the readers of a folder tell one
TEMPORARY_SUFFIX = r"\.tmp-\d+-[0-9a-f]{16}"


def own_temporary(path: str | Path, mode: int = 0o600) -> tuple[Path, int]:
    """(name, descriptor open for writing) of a new file beside ``path``; ``mode`` before the umask (0o600: the
    writer's alone until it sets the mode of the finished file; 0o666: what the umask gives any file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return _made_beside(Path(path), lambda tmp: os.open(tmp, flags, mode))


def own_folder(path: str | Path) -> Path:
    """A new folder beside ``path``, to build ``path`` in and rename, with the permissions the umask gives any folder
    (``tempfile.mkdtemp``'s are the owner's alone, which the rename would pass on to ``path``)."""
    return _made_beside(Path(path), os.mkdir)[0]


def made_beside(path: str | Path) -> list[Path]:
    """The temporaries there are beside ``path`` (``.NAME.tmp-PID-TOKEN``, any writer's, live or killed), sorted."""
    return made_beside_each([path])


def made_beside_each(paths: Iterable[str | Path]) -> list[Path]:
    """:func:`made_beside` of each of ``paths``, each folder listed once (a writer of a file per image), sorted."""
    wanted: dict[Path, set[str]] = {}
    for path in map(Path, paths):
        wanted.setdefault(path.parent, set()).add(path.name)
    own, found = re.compile(rf"\.(.+){TEMPORARY_SUFFIX}"), []
    for folder, names in wanted.items():
        try:
            listed = os.listdir(folder)
        except FileNotFoundError:
            continue
        found += [folder / name for name in listed if (match := own.fullmatch(name)) and match[1] in names]
    return sorted(found)


def remove_made_beside(path: str | Path, keep: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove the folders :func:`made_beside` finds beside ``path`` but those ``keep(folder)`` is true for -> those
    kept. Only for a caller holding the lock that every writer of ``path`` holds while it writes: then no writer lives,
    and each folder is a killed one's. A file or link of such a name is left: no writer of a folder made it."""
    kept = []
    for folder in made_beside(path):
        if folder.is_symlink() or not folder.is_dir():
            continue
        if keep is not None and keep(folder):
            kept.append(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return kept


def _made_beside(path: Path, make: Callable[[Path], T]) -> tuple[Path, T]:
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")
        try:
            return tmp, make(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name beside it", str(path))
