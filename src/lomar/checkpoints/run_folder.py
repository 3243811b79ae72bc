"""Which checkpoint of a run folder (``--out`` of pretrain, finetune, detect, segment) a reader takes; torch-free."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lomar.checkpoints.file_names import BEST, CONFIG_NAME, LAST, LAST_POINTER

__all__ = ["run_checkpoints", "run_checkpoint", "sharded_checkpoint", "model_file"]

_SHARDED = re.compile(r"checkpoint-\d+\.dcp")  # the folder name only: last.json leads nowhere outside its run


def run_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints a run folder holds, in the order a reader takes them: its ``best.pt`` (the best evaluation of
    finetune, detect or segment), then its ``last.pt``; empty where ``folder`` is not a folder holding either."""
    return [folder / name for name in (BEST, LAST) if (folder / name).is_file()]


def run_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a run folder is read by, the first of :func:`run_checkpoints`; None where it holds neither."""
    return next(iter(run_checkpoints(folder)), None)


def sharded_checkpoint(folder: Path) -> Path | None:
    """The newest sharded checkpoint of a ``lomar pretrain --fsdp`` run folder, the ``checkpoint-N.dcp`` its
    ``last.json`` names (whether it is there or not); None where it names none."""
    try:
        name = str(json.loads((folder / LAST_POINTER).read_text())["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # none, or not one lomar wrote
        return None
    return folder / name if _SHARDED.fullmatch(name) else None


def model_file(path: Path) -> Path:
    """What a reader reads of ``path``: a run folder without an export (finetune's, detect's, segment's, a pretraining
    stopped before its end) through :func:`run_checkpoint`, else (an ``--fsdp`` pretraining stopped before its end
    consolidated it into last.pt) its newest sharded checkpoint; anything else as it is (an export folder, which a
    finished pretraining run's folder is, gives its encoder). Readers take it through
    :func:`~lomar.checkpoints.export_leftovers.readable_file`, which also refuses a folder whose export was set aside,
    as only a torch-side look at its leftovers tells."""
    if path.is_dir() and not (path / CONFIG_NAME).exists():
        sharded = sharded_checkpoint(path)
        return run_checkpoint(path) or (sharded if sharded is not None and sharded.is_dir() else path)
    return path
