"""What a write_export killed midway leaves in an export folder: the files it set aside (``.NAME.old-PID``), those it
was renaming in (``.NAME.new-PID``) and their temporaries. A reader names them; the next export removes them.

An export holds no lock, so only a dead process's are stale: a live one's may be in the middle of its swap.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lomar.checkpoints.file_names import CONFIG_NAME

__all__ = ["stale_leftovers", "interrupted_export"]

# ".config.json.old-PID", ".model.safetensors.new-PID" and atomic_write's "..config.json.new-PID.tmp-PID"
_LEFTOVER = re.compile(r"\.\.?(?P<name>.+?)\.(?P<kind>old|new)-(?P<pid>\d+)(?:\.tmp-\d+)?")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # no process has such an id
        return False
    return True


def stale_leftovers(folder: Path) -> list[tuple[Path, str]]:
    """Each leftover of a dead write_export in ``folder`` (of config.json or a safetensors file), with its kind: 'old'
    (the previous export's file) or 'new'."""
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        match = _LEFTOVER.fullmatch(path.name)
        if match and (match["name"] == CONFIG_NAME or match["name"].endswith(".safetensors")) and path.is_file():
            if not _alive(int(match["pid"])):
                found.append((path, match["kind"]))
    return found


def interrupted_export(folder: Path) -> str:
    """Words for a folder without config.json that holds a dead export's set-aside files, else ''."""
    old = [path for path, kind in stale_leftovers(folder) if kind == "old"]
    if not old:
        return ""
    names = ", ".join(_LEFTOVER.fullmatch(path.name)["name"] for path in old)
    return (f"an export into it was interrupted: its previous files are {', '.join(path.name for path in old)} "
            f"(export again, or rename them back to {names}); ")
