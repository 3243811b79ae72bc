"""Why a folder given as a root of class folders (ImageFolder's ROOT/CLASS/IMAGE) is none, and what to pass instead;
no torch, so that a command's argument checks say it before torch is imported."""

from __future__ import annotations

import os
import shlex
from itertools import islice
from pathlib import Path

from lomar.data.image_names import is_image_name

__all__ = ["not_a_class_root"]


def not_a_class_root(root: Path) -> str:
    """Why ``root`` cannot hold class folders, and what to pass instead. A missing ``train``/``val`` below an existing
    folder is named as the split its parent lacks: knn, linprobe and finetune look for ``DATA/train`` and ``DATA/val``,
    and a folder of images or of class folders given as ``DATA`` would otherwise be told about a path its user never
    wrote; what that folder holds says which mistake it is (a split given for the root, a folder to pretrain on)."""
    data = root.parent
    if not root.exists() and root.name in ("train", "val") and data.is_dir():
        lead = f"{data} holds no {root.name}/ folder"
        if data.name in ("train", "val") and all((data.parent / split).is_dir() for split in ("train", "val")):
            return f"{lead}: it is a split itself; pass its parent {data.parent} (which holds train/ and val/)"
        if any(entry.is_file() and is_image_name(entry.name) for entry in _first_entries(data)):
            return (f"{lead}: it holds images, not class folders (a folder to pretrain on: lomar pretrain --data "
                    f"{shlex.quote(str(data))}); labelled images go in ROOT/train/CLASS/IMAGE and ROOT/val/CLASS/IMAGE")
        return (f"{lead}: expected the split's class folders there ({root}/CLASS/IMAGE, beside "
                f"{'val' if root.name == 'train' else 'train'}/)")
    what = "does not exist" if not root.exists() else "is not a folder"
    return f"{root} {what}: expected a folder of class folders (ImageFolder layout: ROOT/CLASS/IMAGE)"


def _first_entries(folder: Path, limit: int = 1000) -> list[os.DirEntry]:
    """At most ``limit`` entries of ``folder``: enough to tell a folder of images, without listing a large one."""
    with os.scandir(folder) as entries:
        return list(islice(entries, limit))
