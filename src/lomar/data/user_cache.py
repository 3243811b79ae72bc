"""Where lomar keeps what it worked out about a dataset between runs, and which of those files it may believe.

One folder of the user's, a subfolder per kind (``coco``: :mod:`lomar.data.coco_shared`'s packed splits; ``segment``:
:mod:`lomar.data.pair_checks`' checked image/annotation pairs): the dataset may be read-only and is not ours, and a
run folder would serve that run's resumes only. A file there is believed only when it is a regular file of this
user's that no one else may write: whoever can write it decides what a run takes from it unchecked (for a pickle,
what code runs).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib.util
import os
import stat
from pathlib import Path

__all__ = ["cache_folder", "code_digest", "ours_alone"]


def cache_folder(kind: str) -> Path:
    """``$LOMAR_CACHE_DIR/kind``, else ``$XDG_CACHE_HOME/lomar/kind``, else ``~/.cache/lomar/kind``. OSError naming the
    fix where there is none of these: no HOME, and no home folder of this user's in the password database (a
    container run as a user id it does not list)."""
    if root := os.environ.get("LOMAR_CACHE_DIR"):
        return Path(root) / kind
    if root := os.environ.get("XDG_CACHE_HOME"):
        return Path(root) / "lomar" / kind
    home = os.path.expanduser("~")
    if home == "~":  # expanduser found no home; Path.home() would raise a bare RuntimeError
        raise OSError(errno.ENOENT, "this user has no home folder (HOME is not set) to keep lomar's cache in; set "
                                    "LOMAR_CACHE_DIR to a folder this user may write")
    return Path(home) / ".cache" / "lomar" / kind


def ours_alone(info: os.stat_result) -> bool:
    """Whether ``info`` (of ``os.lstat`` or ``os.fstat``) is a regular file of this user's that no one else may
    write."""
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


@functools.cache
def code_digest(*modules: str) -> str:
    """A digest of the source files of ``modules`` (dotted names), in that order: what a cache file records of the code
    that decided its content, so that the file of other code is not believed."""
    digest = hashlib.sha256()
    for name in modules:
        digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return digest.hexdigest()[:16]
