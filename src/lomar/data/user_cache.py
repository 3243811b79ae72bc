"""Where lomar keeps what it worked out about a dataset between runs, and which of those files it may believe.

One folder of the user's, a subfolder per kind (``coco``: :mod:`lomar.data.coco_shared`'s packed splits; ``segment``:
:mod:`lomar.data.pair_checks`' checked image/annotation pairs): the dataset may be read-only and is not ours, and a
run folder would serve that run's resumes only. A file there is believed only when it is a regular file of this
user's that no one else may write: whoever can write it decides what a run takes from it unchecked (for a pickle,
what code runs).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["cache_folder", "ours_alone"]


def cache_folder(kind: str) -> Path:
    """``$LOMAR_CACHE_DIR/kind``, else ``$XDG_CACHE_HOME/lomar/kind``, else ``~/.cache/lomar/kind``."""
    if root := os.environ.get("LOMAR_CACHE_DIR"):
        return Path(root) / kind
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lomar" / kind


def ours_alone(info: os.stat_result) -> bool:
    """Whether ``info`` (of ``os.lstat`` or ``os.fstat``) is a regular file of this user's that no one else may
    write."""
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022
