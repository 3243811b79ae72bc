"""Where a file or folder a run's checkpoint names lies when it names it relative: a checkpoint of lomar before
2026-12-05 holds its file and folder settings as they were given, relative to the folder that run was started in,
which it does not record. That folder is told from the run's ``--out``, which it recorded as given too: the run folder
(where the checkpoint is) less that relative ``--out``. Torch-free: the commands' settings checks read it."""

from __future__ import annotations

import os
from pathlib import Path

from lomar.train.settings import ConfigError

__all__ = ["started_in", "recorded_path"]


def started_in(out: object, checkpoint: str | Path) -> Path | None:
    """The working folder the run of ``checkpoint`` (a file in its run folder) was started in, told from the ``out``
    it recorded; None where that is absolute or not a plain path down, or where the run folder does not end with it
    (the folder moved or renamed since, or a checkpoint copied out of it)."""
    if not isinstance(out, str) or not out.strip() or Path(out).expanduser().is_absolute():
        return None
    down = Path(os.path.normpath(out)).parts
    if ".." in down:
        return None
    folder = Path(os.path.abspath(Path(checkpoint).parent))
    if not down:  # --out .: the run folder is the folder it was started in
        return folder
    if folder.parts[-len(down):] != down:
        return None
    return Path(*folder.parts[:-len(down)])


def recorded_path(value: str, settings: dict, checkpoint: str | Path, refusal: str, fix: str) -> str:
    """``value``, a file or folder the run of ``checkpoint`` recorded in its ``settings``, as a path to read now: one
    recorded absolute as it is; a relative one under the folder that run was started in (:func:`started_in`).
    ConfigError where that folder is not told, in one line: ``refusal`` (what the recorded path is for), why, and
    ``fix``, naming the path of that name under this working folder where there is one. That one is not taken: it
    is the run's only where the run was started here, which nothing tells, and a split of another dataset under
    the same relative name would be scored without a word."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return value
    if (start := started_in(settings.get("out"), checkpoint)) is not None:
        return str(start / path)
    here = f"; this folder holds {path.absolute()}: pass it if it is that one" if path.exists() else ""
    raise ConfigError(f"{refusal}, {value}, recorded relative to the folder that run was started in, which its "
                      f"checkpoint does not tell ({_untold(settings.get('out'), checkpoint)}); {fix}{here}")


def _untold(out: object, checkpoint: str | Path) -> str:
    """Why :func:`started_in` tells no folder for ``out`` and ``checkpoint``."""
    if not isinstance(out, str) or not out.strip():
        return "it recorded no --out"
    if Path(out).expanduser().is_absolute():
        return f"the --out it recorded, {out}, is absolute"
    if ".." in Path(os.path.normpath(out)).parts:
        return f"the --out it recorded, {out}, goes up with '..'"
    return (f"its folder, {os.path.abspath(Path(checkpoint).parent)}, does not end with the --out it recorded, {out}: "
            f"moved, renamed or copied out since")
