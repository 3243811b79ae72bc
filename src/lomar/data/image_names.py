"""Which file names a folder search, a .txt list and a tar shard take for images, and which folders they pass over;
no torch, so that a command's argument checks read them before it is imported."""

from __future__ import annotations

__all__ = ["IMAGE_EXTENSIONS", "THUMBNAIL_FOLDERS", "SYSTEM_FOLDERS", "is_image_name", "passed_over_folder",
           "file_suffix"]

# .jfif and .jpe are JPEG's other names (Chrome on Windows saves photos as .jfif)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Thumbnail caches (Synology's @eaDir, macOS zips' __MACOSX): copies, not photos; folders and shards pass them over
THUMBNAIL_FOLDERS = ("@eaDir", "__MACOSX")
# What a NAS or a disk keeps at a share's or a drive's root: deleted files (Synology's #recycle, Windows' $RECYCLE.BIN),
# a copy of the whole share per snapshot (#snapshot, when made visible), fsck's and Windows' own folders
SYSTEM_FOLDERS = ("#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information", "lost+found")


def is_image_name(name: str) -> bool:
    """An image extension, and not macOS's AppleDouble metadata (``._NAME``, which macOS writes beside each file on
    foreign disks, in zips and tar files): never an image, and one per photo would make half a set unreadable."""
    base = name.rstrip("/").rpartition("/")[2]
    return file_suffix(base).lower() in IMAGE_EXTENSIONS and not base.startswith("._")


def passed_over_folder(name: str) -> bool:
    """Whether a folder of this name is passed over by a folder search and a tar shard alike: hidden (``.NAME``; a
    tar member's ``./`` is the archive's root), a thumbnail cache or a NAS's or a disk's housekeeping folder, by its
    exact name, as a .txt list's lines are matched (``lost+found_2`` is a class)."""
    return name in THUMBNAIL_FOLDERS or name in SYSTEM_FOLDERS or (name.startswith(".") and name not in (".", ".."))


def file_suffix(name: str) -> str:
    """``PurePath(name).suffix`` of a file name without a directory, without building a Path: a folder search calls
    this for every file, and a Path each cost 13 of the 23 s of listing 1.28M ImageNet names on a 2-core machine."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""
