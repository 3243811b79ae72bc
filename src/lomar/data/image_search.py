"""The search of a folder for images.

Folders are searched recursively and symlinked sub-folders are followed, each real folder at most once (a link back to
the searched folder or an ancestor of it is not a loop forever), each file once (a link to an image listed under another
path is used once, said); hidden sub-folders (``.thumbnails``, ``.cache``) and thumbnail caches (Synology's ``@eaDir``,
macOS zips' ``__MACOSX``) are not searched, and hidden image files (``.NAME.jpg``) not used, each with a warning of
their count: a leading '.' hides a file as it hides a folder (torchvision's ImageFolder takes both). A dangling link
with an image name is kept in the list: reading it fails, and the dataset skips and counts it like any other unreadable
file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lomar.data.image_names import THUMBNAIL_FOLDERS, file_suffix, is_image_name, passed_over_folder
from lomar.data.pathtable import PathTable, sort_like_paths
from lomar.data.walk import folder_prefix, once_each, walk

__all__ = ["find_images", "image_table", "search_images", "warn_passed_over"]

log = logging.getLogger("lomar.data")


# Photo formats that IMAGE_EXTENSIONS leaves out (iPhones save HEIC, cameras RAW; Pillow's TIFF reader would read a
# DNG's first image, its small preview): passed over like any other file, but said
_FOREIGN_IMAGES = (".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf",
                   ".pef", ".srw")


def find_images(root: str | Path) -> list[Path]:
    """Image-named entries under ``root``, sorted (see the module docstring); a folder reached a second time
    through a link is skipped with a warning."""
    return list(image_table(root))


def image_table(root: str | Path, limit: int | None = None) -> PathTable:
    """:func:`find_images`'s paths as a :class:`PathTable`, without a Path object per image on the way; past ``limit``
    images, some ``limit`` + 1 or more of them (:func:`search_images`), and no warning of what it passed over."""
    found, passed_over = search_images(root, limit)
    if limit is None or len(found) <= limit:  # a search stopped short would warn of part of the folder
        warn_passed_over(root, passed_over)
    return PathTable(found)


def search_images(root: str | Path, limit: int | None = None) -> tuple[list[str], dict]:
    """(``str`` of :func:`find_images`'s paths, what it passed over: {"loops": int, "hidden": [Path], "forks": int,
    "hidden_files": [Path], "unlisted": [OSError], "foreign": [Path], "twice": [(path, path)]}) for
    :func:`warn_passed_over`, which says it once for any number of searches; and "folders": [((st_dev, st_ino),
    folder)] searched, for class folders. Given a ``limit``, the search stops at the first folder that takes it past
    ``limit`` distinct images: the paths are then more than ``limit`` of the folder's, not all of them, for a caller
    that refuses so many without listing a huge folder whole."""
    found: list[str] = []
    # A link to an ancestor of root leads back into root (a class folder's link to the ImageFolder root
    # would give that class every other class's images): searched already, as root itself is.
    seen = {(info.st_dev, info.st_ino) for info in map(os.stat, Path(root).resolve().parents)}
    loops = forks = 0
    unlisted: list[OSError] = []  # os.walk passes over a folder it cannot list (no permission) without a word
    hidden: list[Path] = []  # sub-folders passed over (image_names.passed_over_folder)
    hidden_files: list[Path] = []  # image-named .NAME files (._NAME, AppleDouble, counted as forks)
    foreign: list[Path] = []  # photos in formats lomar does not decode
    folders: list[tuple[tuple[int, int], str]] = []
    links: list[str] = []  # image-named symlinks, which may list an image twice
    for folder, dirs, files, linked in walk(root, unlisted.append):
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            loops += 1
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        folders.append(((info.st_dev, info.st_ino), folder))
        hidden += [Path(folder) / name for name in dirs if passed_over_folder(name)]
        dirs[:] = sorted(name for name in dirs if not passed_over_folder(name))
        dotted = [name for name in files if name[:1] == "."]
        forks += sum(name.startswith("._") and is_image_name(name[2:]) for name in dotted)  # see is_image_name
        hidden_files += [Path(folder) / name for name in dotted if is_image_name(name)]  # is_image_name: no ._NAME
        prefix = folder_prefix(folder)
        found.extend(prefix + name for name in files if name[:1] != "." and is_image_name(name))  # dangling links too
        links += [prefix + name for name in linked if name[:1] != "." and is_image_name(name)]
        # links to images listed already are not more images: counted once, as once_each keeps them
        if limit is not None and len(found) > limit and len(once_each(sort_like_paths(found), links,
                                                                       dict(folders))[0]) > limit:
            break
        foreign += [Path(folder) / name for name in sorted(files)  # a ._NAME beside each: a Mac's metadata, no photo
                    if file_suffix(name).lower() in _FOREIGN_IMAGES and not name.startswith("._")]
    found, twice = once_each(sort_like_paths(found), links, dict(folders))
    return found, {"loops": loops, "hidden": hidden, "forks": forks, "hidden_files": hidden_files,
                   "unlisted": unlisted, "foreign": foreign, "twice": twice, "folders": folders}


def warn_passed_over(root: str | Path, passed_over: dict) -> None:
    loops, hidden, forks, unlisted, foreign = (passed_over[key] for key in ("loops", "hidden", "forks", "unlisted",
                                                                           "foreign"))
    if loops:
        log.warning("%s: %d symlinked folder(s) lead to a folder already searched (a loop or a duplicate); "
                    "searched once", root, loops)
    if twice := passed_over["twice"]:
        log.warning("%s: %d symlink(s) lead to an image already listed (e.g. %s and %s are one file); used once",
                    root, len(twice), *twice[0])
    if hidden:  # a hidden folder is the example when there is one: renaming it is advice only it can take
        example = min((path for path in hidden if path.name.startswith(".")), default=min(hidden))  # os.walk's order
        advice = ("name it without a leading '.' to use its images" if example.name.startswith(".") else
                  "thumbnails a NAS or a macOS zip made of the photos" if example.name in THUMBNAIL_FOLDERS
                  else "deleted files, snapshot copies or a disk's own files")
        log.warning("%s: %d hidden or thumbnail folder(s) not searched, e.g. %s (%s)", root, len(hidden), example,
                    advice)
    if forks:
        log.warning("%s: %d macOS metadata file(s) named ._IMAGE skipped (AppleDouble, not images)", root, forks)
    if hidden_files := passed_over["hidden_files"]:
        log.warning("%s: %d hidden image file(s) not used, e.g. %s (name it without a leading '.' to use it)", root,
                    len(hidden_files), min(hidden_files))
    if unlisted:
        log.warning("%s: %d folder(s) could not be listed, e.g. %s (%s); their images are not used: fix the "
                    "permissions", root, len(unlisted), unlisted[0].filename, unlisted[0].strerror or unlisted[0])
    if foreign:
        log.warning("%s: %d image(s) in a format lomar does not read, e.g. %s, are not used; convert them to JPEG or "
                    "PNG", root, len(foreign), foreign[0])
