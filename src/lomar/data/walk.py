"""The walk of a folder search: ``os.walk`` that also names the files that are symlinks, and the images listed twice
through them (a folder of links into another searched folder, a "curated subset", gave each such image twice an
epoch).

``os.walk`` gives names only: telling a link from a file after it is an lstat per file, which took a listing of 100k
files from 0.13 to 1.0 s (ImageNet's 1.28M files about 11 s more; 2-core machine). The ``os.DirEntry`` that
``os.scandir`` gives knows it from the listing itself, so a folder without links costs what ``os.walk`` does, and
only the links are resolved.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["walk", "folder_prefix", "once_each"]


def walk(top: str | os.PathLike, onerror: Callable[[OSError], object]) -> Iterator[tuple[str, list, list, list]]:
    """``os.walk(top, followlinks=True, onerror=onerror)`` (top-down: prune ``dirs`` in place to search fewer), each
    folder's tuple with a fourth item: the names in its ``files`` that are symlinks."""
    stack = [os.fspath(top)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:
            onerror(exc)
            continue
        dirs: list[str] = []
        files: list[str] = []
        links: list[str] = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:  # a link that cannot be followed: a file, as os.walk has it
                is_dir = False
            if is_dir:
                dirs.append(entry.name)
            else:
                files.append(entry.name)
                if entry.is_symlink():
                    links.append(entry.name)
        yield folder, dirs, files, links
        stack += [os.path.join(folder, name) for name in reversed(dirs)]


def folder_prefix(folder: str) -> str:
    """What ``str(Path(folder) / name)`` is ``name`` after, for a name a listing gives (no separator, no "." or ".."):
    the strings of a search's paths made without a Path object each (building and sorting ImageNet's 1.28M Paths
    took 66 s on a 2-core machine, the whole listing 5-7 s without)."""
    prefix = str(Path(folder))
    return "" if prefix == "." else prefix if prefix.endswith(os.sep) else prefix + os.sep


def once_each(found: list[str], links: list[str], folders: dict[tuple[int, int], str]) -> tuple[list, list]:
    """(``found`` less each link to a file listed under another path (the file's own path kept where listed, else
    its first link in sorted order), (that link, the path kept) for each), where ``found`` is a search's sorted paths,
    ``links`` the symlinks among them and ``folders`` maps the (st_dev, st_ino) of each folder searched to its path as
    walked. A dangling or looping link is no file: kept, to be skipped and counted when read, as a folder search keeps
    it."""
    same: dict[str, tuple[int, int]] = {}  # path -> (st_dev, st_ino) of the file it is
    into: dict[str, str | None] = {}  # folder a link names -> folder_prefix of it as walked; None: not searched
    for link in links:
        try:
            info = os.stat(link)
            # the file the link leads to, through any link it names (one outside the search would hide the file
            # listed inside): the paths the links hold, not os.path.realpath's (an lstat a component: 80 us a link,
            # 10k links 0.8 s); a chain ends, as os.stat followed it
            target = link
            while os.path.islink(target):
                target = os.path.join(os.path.dirname(target), os.readlink(target))
            if (folder := os.path.dirname(target) or ".") not in into:
                searched = folders.get(((there := os.stat(folder)).st_dev, there.st_ino))
                into[folder] = None if searched is None else folder_prefix(searched)
        except OSError:
            continue
        same[link] = (info.st_dev, info.st_ino)
        if into[folder] is not None:  # what the link names, as the walk listed it
            same[into[folder] + os.path.basename(target)] = same[link]
    if not same:
        return found, []
    first: dict[tuple[int, int], str] = {}  # the path kept of each file: its own where listed, else its first link's
    linked = set(links)
    for path in found:
        if (key := same.get(path)) and (key not in first or first[key] in linked and path not in linked):
            first[key] = path
    twice = [(path, first[key]) for path in found if (key := same.get(path)) and first[key] != path]
    dropped = {path for path, _ in twice}
    return ([path for path in found if path not in dropped] if twice else found), twice
