"""A dataset's file paths packed into one byte buffer and an offset array: no Python object per path.

Loader workers are forked from the process that lists the data. A list of 1.28 million ``Path`` objects (ImageNet's
train split) is ~0.5 GiB in that process, and every worker that reads an item increments the refcount of its
path object, writing to (and so copying) the page that holds it: over one epoch each worker came to hold its
own copy of most of the list (private memory 60 -> 572 MiB per worker, measured on a 1.28M-file tree; 8 workers
on each of 8 GPUs are 32 GiB). Two numpy arrays have no per-path objects, so reading a path writes nothing
shared and the workers' pages stay the parent's. Spawned workers (macOS, Windows) are each sent a copy of the two
arrays instead, pickled: 73 MB for 1.28M paths of 49 characters on average (/data/imagenet/train/nC/nC_I.JPEG).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = ["PathTable", "sort_like_paths", "join_text", "dangling_link"]


class PathTable(Sequence):
    """An immutable sequence of paths; ``table[i]`` is a :class:`~pathlib.Path`, ``table.text(i)`` the string it
    was built from (``os.fspath``), a slice another table. Names that are not valid UTF-8 are kept byte for byte
    (``os.fsencode``)."""

    def __init__(self, paths: Iterable[str | os.PathLike] = ()):
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=self._offsets[1:])
        self._buffer = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _position(self, index: int) -> int:
        size = len(self)
        i = index + size if index < 0 else index
        if not 0 <= i < size:
            raise IndexError(f"path index {index} out of range for {size} paths")
        return i

    def text(self, index: int) -> str:
        i = self._position(int(index))
        return os.fsdecode(self._buffer[self._offsets[i]:self._offsets[i + 1]])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PathTable(self.text(i) for i in range(*index.indices(len(self))))
        return Path(self.text(index))

    def __iter__(self) -> Iterator[Path]:
        return (Path(self.text(i)) for i in range(len(self)))

    def __repr__(self) -> str:
        return f"PathTable({len(self)} paths)"


def sort_like_paths(paths: Iterable[str]) -> list[str]:
    """``paths`` (normalised path strings, as ``str(Path(p))`` gives), without duplicates, in the order of
    ``sorted(map(Path, paths))``: by their components, which is the string order with the separator below every
    other character ("a/b" before "a-c", as the component "a" is before "a-c"). A million paths sort in a second
    here, where building and sorting Path objects took about a minute on a 2-core machine."""
    return sorted(dict.fromkeys(paths), key=lambda text: text.replace(os.sep, "\0"))


def join_text(folder: str, text: str) -> str:
    """``str(Path(text))`` when ``text`` is absolute, else ``str(Path(folder) / text)`` (``folder`` already normalised,
    as ``str(Path(...))`` gives it), without building a Path for a name that needs no normalising: a .txt list of
    1.28M lines took 14.5 s of CPU through two Paths a line (2-core machine)."""
    if os.sep != "/" or os.altsep:  # Windows' drives and separators: pathlib's rules
        return str(Path(text)) if Path(text).is_absolute() else str(Path(folder) / text)
    while text.startswith("./"):  # find . > list.txt writes every line so
        text = text[2:].lstrip("/")
    if not text or text == "." or "//" in text or "/./" in text or text.endswith(("/", "/.")):
        return str(Path(text)) if text.startswith("/") else str(Path(folder) / text)
    if text.startswith("/") or folder == ".":
        return text
    return (folder if folder.endswith("/") else folder + "/") + text


def dangling_link(path: str | os.PathLike) -> str | None:
    """What ``path``, found missing, is when it is a link (``ls`` lists it, so "does not exist" says too little): "a
    link to TARGET, which does not exist", and for a link to a link (that one exists) the name at the chain's end
    too; None when ``path`` is no link."""
    if not os.path.islink(path):
        return None
    target = os.readlink(path)
    on = (f", which links on to {os.path.realpath(path)}"
          if os.path.islink(os.path.join(os.path.dirname(path), target)) else "")
    return f"a link to {target}{on}, which does not exist"
