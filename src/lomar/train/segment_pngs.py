"""Label maps written into a folder that lomar shares with its user: segment's ``OUT/predictions/`` (each evaluation's
PNGs, replacing the last one's) and a segmenter's ``lomar predict --out DIR`` (``--overwrite``: this predict's PNGs in
place of an earlier one's). The PNGs an earlier write left of images not written this time are removed, as a user
takes every PNG there for the last write's. Which files lomar wrote is told by the folder's list (:data:`WRITTEN`),
not by their names: the folder may hold a user's own files, PNGs too, which stay."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from lomar.checkpoints.io import atomic_write_bytes, atomic_write_text

__all__ = ["WRITTEN", "write_label_maps", "begin_label_maps", "end_label_maps"]

# in the folder: {"pngs": [the label maps lomar wrote there, each a path below it with '/' between its parts]}
WRITTEN = ".lomar-written.json"


def write_label_maps(folder: Path, pngs: Iterable[tuple[str, bytes]]) -> int:
    """Write each ``(stem, png)`` as ``folder/<stem>.png`` (made if need be) and remove the label maps the folder's
    list names that this call does not write (:func:`begin_label_maps`, :func:`end_label_maps`); the count of the
    other PNGs left there that lomar cannot tell from a user's (:func:`end_label_maps`)."""
    pngs = list(pngs)
    names = {f"{stem}.png" for stem, _ in pngs}
    before = begin_label_maps(folder, names)
    for stem, data in pngs:
        atomic_write_bytes(folder / f"{stem}.png", data)
    return end_label_maps(folder, before, names)


def begin_label_maps(folder: Path, names: set[str]) -> set[str] | None:
    """Before the first of ``names`` (paths below ``folder``, '/' between their parts) is written: list them with
    those an earlier write listed, which it returns (None where the folder holds no list lomar reads). The list then
    names every label map there may be of lomar's at any moment (the earlier ones with these, until
    :func:`end_label_maps`), so a kill midway leaves no PNG of lomar's unlisted, and the next write removes what it
    does not write again."""
    folder.mkdir(parents=True, exist_ok=True)
    before = _written(folder)
    if before is None or not names <= before:
        _list(folder, (before or set()) | names)
    return before


def end_label_maps(folder: Path, before: set[str] | None, written: set[str], remove: bool = True) -> int:
    """After the writes: remove the label maps ``before`` names (:func:`begin_label_maps`) that are not ``written``,
    a sub-folder they leave empty with them, and list ``written`` alone; ``remove`` False (predict without
    --overwrite, adding to the folder): remove none, and list them with ``written``. A link there, or a path through
    one, is the user's and stays. The count of the PNGs left that lomar cannot tell from a user's: with ``remove``,
    where the folder held no list (``before`` None: an earlier write's that kept none, or a user's), those below it
    that were not written; else 0."""
    unlisted = before is None
    before = before or set()
    if not remove:
        written = before | written
    for name in sorted(before - written):
        if _inside(folder, name) and (path := folder / name).is_file():
            path.unlink(missing_ok=True)
            for parent in list(PurePosixPath(name).parents)[:-1]:  # up to, not including, the folder
                try:
                    (folder / parent).rmdir()
                except OSError:  # not empty: another PNG, or a user's file
                    break
    if written != before:
        _list(folder, written)
    if not (remove and unlisted):
        return 0
    return _unlisted(folder, written)


def _unlisted(folder: Path, written: set[str]) -> int:
    """The PNGs below ``folder`` that are not ``written`` and that lomar could have listed (:func:`_below`): a hidden
    folder, which holds none such, and a link, the user's, are not entered. One listing of each folder it enters,
    read from its entries (no stat of a file): a folder lomar is pointed at may be a dataset's of many thousand PNGs."""
    left, todo = 0, [(str(folder), "")]
    while todo:
        top, below = todo.pop()
        try:
            with os.scandir(top) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or "\\" in entry.name or entry.is_symlink():
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        todo.append((entry.path, f"{below}{entry.name}/"))
                    elif entry.name.endswith(".png") and f"{below}{entry.name}" not in written:
                        left += 1
        except OSError:  # a folder it cannot list is not counted, not a reason to fail the writes done
            continue
    return left


def _written(folder: Path) -> set[str] | None:
    """The label maps ``folder``'s list names: paths of PNGs below it, any other entry (a path out of it, a hidden
    one) left out; None where it has no list, or one lomar cannot read."""
    try:
        names = json.loads((folder / WRITTEN).read_text(encoding="utf-8"))["pngs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {name for name in names if isinstance(name, str) and _below(name)} if isinstance(names, list) else None


def _below(name: str) -> bool:
    """Whether ``name`` is what lomar lists: a PNG's path below the folder, none of its parts hidden, '..' or empty."""
    parts = name.split("/")
    return name.endswith(".png") and "\\" not in name and all(part and not part.startswith(".") for part in parts) \
        and not PurePosixPath(name).is_absolute()


def _inside(folder: Path, name: str) -> bool:
    """Whether ``folder/name`` is reached through no link: a link there, or a sub-folder made a link to elsewhere,
    is the user's."""
    path, parent = folder / name, PurePosixPath(name).parent.parts
    return not path.is_symlink() and os.path.realpath(path.parent) == os.path.join(os.path.realpath(folder), *parent)


def _list(folder: Path, names: set[str]) -> None:
    """Replace ``folder``'s list with ``names`` (atomically: a kill leaves the old list or the new)."""
    atomic_write_text(folder / WRITTEN, json.dumps({"pngs": sorted(names)}) + "\n")
