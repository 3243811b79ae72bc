"""An evaluation's label maps in ``OUT/predictions/``: each one's PNG written, and those an earlier evaluation wrote
for images this one did not score (an ``--eval-only --overwrite`` of another split, an image skipped this time)
removed, as a user takes every PNG there for the last evaluation's. Which files lomar wrote is told by the folder's
list (:data:`WRITTEN`), not by their names: the folder may hold a user's own files, PNGs too, which stay."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from lomar.checkpoints.io import atomic_write_bytes, atomic_write_text

__all__ = ["WRITTEN", "write_label_maps"]

WRITTEN = ".lomar-written.json"  # in the folder: {"pngs": [the names of the label maps lomar wrote there]}


def write_label_maps(folder: Path, pngs: Iterable[tuple[str, bytes]]) -> None:
    """Write each ``(stem, png)`` as ``folder/<stem>.png`` (made if need be) and remove the label maps the folder's
    list names that this call does not write. The list names every label map there may be of lomar's at any moment
    (the earlier ones with these before the first write, these alone after the last removal), so a kill midway
    leaves no PNG of lomar's unlisted, and the next call removes what it does not write again."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = list(pngs)
    now, before = {f"{stem}.png" for stem, _ in pngs}, _written(folder)
    if not now <= before:
        _list(folder, before | now)
    for stem, data in pngs:
        atomic_write_bytes(folder / f"{stem}.png", data)
    for name in sorted(before - now):
        if (path := folder / name).is_file() and not path.is_symlink():  # a link there is the user's
            path.unlink(missing_ok=True)
    if now != before:
        _list(folder, now)


def _written(folder: Path) -> set[str]:
    """The label maps ``folder``'s list names (none where it has none, or one lomar cannot read): plain names of
    PNGs in it, any other entry (a path out of it) left out."""
    try:
        names = json.loads((folder / WRITTEN).read_text(encoding="utf-8"))["pngs"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {name for name in names if isinstance(name, str) and name.endswith(".png") and not name.startswith(".")
            and "/" not in name and "\\" not in name} if isinstance(names, list) else set()


def _list(folder: Path, names: set[str]) -> None:
    """Replace ``folder``'s list with ``names`` (atomically: a kill leaves the old list or the new)."""
    atomic_write_text(folder / WRITTEN, json.dumps({"pngs": sorted(names)}) + "\n")
