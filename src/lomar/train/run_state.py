"""What every training run does with its folder: clean it, checkpoint into it, resume from it (its lock:
:mod:`lomar.train.run_lock`).

Shared by every training command (:mod:`lomar.train.lifecycle`). A run folder holds ``last.pt`` (the newest
state), ``checkpoint-<step>.pt`` (kept history), ``metrics.jsonl`` and ``.lock``; checkpoints carry every rank's
RNG state (:mod:`lomar.train.rng`) so that a resumed run continues exactly. A sharded run (``--fsdp``) keeps
``checkpoint-<step>.dcp/`` folders instead, ``last.json`` naming the newest, and ``last.pt`` holds its
consolidated model (no optimizer) for export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
import yaml

from lomar.checkpoints.export_leftovers import export_running, is_export_file
from lomar.checkpoints.file_names import BEST, LAST, LAST_POINTER, METRICS, RUN_CONFIG
from lomar.checkpoints.io import (
    atomic_save,
    atomic_write,
    atomic_write_text,
    refuse_link,
    remove_tree,
    safe_load,
)
from lomar.checkpoints.own_names import TEMPORARY_SUFFIX, made_beside_each
from lomar.checkpoints.run_folder import sharded_checkpoint
from lomar.checkpoints.sharded import check_metadata
from lomar.errors import FULL_DISK, UNWRITABLE, LomarError, UsageError, full_disk_words
from lomar.train.rewound_best import rewind_best
from lomar.train.run_lock import RunLock, holds_run_lock
from lomar.train.run_logs import evaluated_after, truncate_metrics
from lomar.train.setting_names import as_given, source_of
from lomar.train.settings import ConfigError
from lomar.values import brief, is_integer
from lomar.viz.reconstruction import snapshot_step

__all__ = ["SaveError", "save_state", "checkpoints_to_prune", "save_checkpoint", "save_on_main_rank",
           "remove_stale_temporaries", "clear_stale_temporaries", "clear_killed_writes", "temporaries",
           "checkpoint_number", "checkpoint_step", "training_step", "read_state", "holds_run", "same_file", "foreign",
           "inside", "remove_newer_checkpoints", "check_out_folder", "read_meta", "point_last_at", "newest_state",
           "refuse_held_run", "prepare_run_folder", "save_error"]

log = logging.getLogger("lomar.train")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.(pt|dcp)$")  # .dcp: a sharded checkpoint folder
_SHARDED_TMP = re.compile(r"^checkpoint-\d+\.dcp\.tmp$")  # a sharded save cut before its rename
_TMP = re.compile(rf"^\..+(?:{TEMPORARY_SUFFIX}|\.tmp(-\d+)?)$")  # atomic_write's .NAME.tmp-PID-TOKEN, plainer ones
T = TypeVar("T")


class SaveError(LomarError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


# ---- checkpoints ----------------------------------------------------------------------
def checkpoint_number(name: str) -> int | None:
    """The step in ``checkpoint-<step>.pt`` or ``checkpoint-<step>.dcp``; None for other names."""
    match = _CHECKPOINT.match(name)
    return int(match[1]) if match else None


def checkpoints_to_prune(paths: list[Path], keep: int) -> list[Path]:
    """All but the ``keep`` newest ``checkpoint-<step>.pt`` (or ``.dcp``), by step number (past 999,999 steps the
    names outgrow their zero padding and no longer sort by age); other names are left alone."""
    ours = [f for f in paths if checkpoint_number(f.name) is not None]
    return sorted(ours, key=lambda f: checkpoint_number(f.name))[:-keep]


def save_state(state: dict, path: Path, previous: Path) -> None:
    """``atomic_save``; a full disk or a folder gone unwritable is a SaveError naming ``previous`` (the state kept)."""
    try:
        atomic_save(state, path)
    except OSError as exc:
        full = exc.errno in FULL_DISK
        if not full and exc.errno not in UNWRITABLE:
            raise
        kept = f"{previous} is intact" if previous.exists() else "no earlier checkpoint exists"
        raise save_error(exc.errno, path, kept, exc.strerror) from None


def save_error(code: int, path: Path, kept: str, reason: str | None = None) -> SaveError:
    """The one-line error of a save of ``path`` that a full disk (``code`` in FULL_DISK) or a folder not writable
    (``reason``: the system's words) stopped: what failed, ``kept`` (what is intact), the fix, the resume."""
    what, fix = ((f"{full_disk_words(code)} to write {path}", "free space") if code in FULL_DISK else
                 (f"cannot write {path} ({reason or 'read-only or not permitted'})", f"make {path.parent} writable"))
    error = SaveError(f"{what}; {kept}; {fix} and resume with --resume auto")
    error.errno = code
    return error


def save_checkpoint(state: dict, out: Path, step: int | None = None, keep_last: int = 0) -> Path:
    """Write ``last.pt`` (+ ``checkpoint-<step>.pt`` given ``step``, pruned to ``keep_last``), each atomically."""
    last = out / LAST
    if step is not None:
        path = out / f"checkpoint-{step:06d}.pt"
        save_state(state, path, last)
    save_state(state, last, path if step is not None else last)  # the same state is intact in checkpoint-<step>.pt
    if step is not None:
        for old in checkpoints_to_prune(list(out.glob("checkpoint-*.pt")), keep_last):
            if old.name != path.name:
                old.unlink(missing_ok=True)
        return path
    return last


def save_on_main_rank(save: Callable[[], T], is_main: bool, device: torch.device) -> T | None:
    """``save()`` on the main rank only (-> its result; None elsewhere). Under DDP this is a
    collective: when the main rank's save fails, every rank raises (the others a SaveError), so
    all leave together instead of the others dying in their next collective with a traceback."""
    result, error = None, None
    if is_main:
        try:
            result = save()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = exc
    if dist.is_available() and dist.is_initialized():
        failed = torch.tensor(float(error is not None), device=device)
        dist.broadcast(failed, src=0)
        if failed.item() and error is None:
            error = SaveError("the main process could not write the checkpoint; see its message")
    if error is not None:
        raise error
    return result


def read_meta(path: Path) -> dict:
    """A training checkpoint without its weights loaded: a sharded folder's meta.pt (once its DCP metadata
    passed :func:`check_metadata`), else the file memory-mapped; OSError or ValueError when it cannot be read."""
    if path.is_dir():
        check_metadata(path)
        ckpt = safe_load(path / "meta.pt")
    else:
        ckpt = safe_load(path, mmap=True)
    # a damaged or crafted file's step 'x' stopped the run with a traceback, a step -5 trained from step -4
    counts = {k: ckpt[k] for k in ("step", "epoch", "batches_done") if k in ckpt}
    if any(not is_integer(v) or v < 0 for v in counts.values()):
        raise ValueError(f"checkpoint {path} holds {brief(counts)}, not counts of steps; the file is damaged: resume "
                         f"from another checkpoint")
    return ckpt


def training_step(path: Path, ckpt: dict) -> int | None:
    """The step of ``ckpt``, read from ``path``, when it is a training state (a sharded folder's, or a file's with
    its optimizer); None otherwise."""
    step = ckpt.get("step")
    return int(step) if (path.is_dir() or "optimizer" in ckpt) and isinstance(step, int) else None


def read_state(path: Path) -> dict | None:
    """:func:`read_meta` of a training checkpoint (file or sharded folder); None when it cannot be read."""
    if path.is_dir() and not (path / ".metadata").is_file():  # not a folder written by fsdp.save_sharded
        return None
    try:
        return read_meta(path)
    except (OSError, ValueError):
        return None


def checkpoint_step(path: Path) -> int | None:
    """The step of a training checkpoint (file or sharded folder); None when it cannot be read or
    holds no training state."""
    ckpt = read_state(path)
    return None if ckpt is None else training_step(path, ckpt)


def point_last_at(out: Path, checkpoint: Path, step: int) -> None:
    """``OUT/last.json``, a sharded run's pointer to its newest ``checkpoint-N.dcp`` (as
    :func:`~lomar.checkpoints.run_folder.sharded_checkpoint` reads it): ``checkpoint``, at ``step``."""
    atomic_write_text(Path(out) / LAST_POINTER, json.dumps({"checkpoint": Path(checkpoint).name, "step": step}) + "\n")


def newest_state(out: Path) -> Path:
    """Where a run's newest resumable state is said to be: the folder ``last.json`` names (a sharded run), else
    ``last.pt``."""
    return sharded_checkpoint(out) or out / LAST


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run: a checkpoint, or the settings of one stopped before its first."""
    return any((Path(out) / name).exists() for name in (LAST, LAST_POINTER, RUN_CONFIG))


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file or folder: also two spellings that resolved paths tell apart (one folder
    in two cases on a case-insensitive file system: macOS, Windows, SMB shares; a bind mount)."""
    try:
        return Path(a).samefile(b)
    except OSError:
        return False


def foreign(resume: Path, out: Path) -> bool:
    """Whether ``resume`` is a checkpoint of another run folder than ``out``."""
    parent = resume.resolve().parent
    return parent != Path(out).resolve() and not same_file(parent, out)


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (one folder spelt two ways too: :func:`same_file`)."""
    path = Path(path).resolve()
    return path.is_relative_to(Path(folder).resolve()) or any(same_file(p, folder) for p in (path, *path.parents))


def remove_newer_checkpoints(out: Path, step: int, outputs: tuple[str, ...] = (), resume: Path | None = None,
                             final: tuple[str, ...] = ()) -> None:
    """After an explicit rewind: drop what was written past ``step``: checkpoints, ``outputs`` files whose name
    carries a later step (``reconstruction-000402.png``), the ``final`` files of the run's end (its export). A
    ``last.pt`` past it becomes a copy of ``resume``: a run dying before its first checkpoint would leave the
    dropped steps newest, for --resume auto to take up again. A sharded ``resume`` (``checkpoint-N.dcp``) becomes what
    ``last.json`` names, and a ``last.pt`` past it (consolidated at a stop or the end) goes: the run's end, and a
    reader of the folder, would take a dropped step's state."""
    for name in final:
        (out / name).unlink(missing_ok=True)
    last = out / LAST
    if resume is not None and resume.is_file() and (checkpoint_step(last) or 0) > step:
        with open(resume, "rb") as source:
            atomic_write(last, lambda handle: shutil.copyfileobj(source, handle))
    if resume is not None and resume.is_dir():
        if (pointed := sharded_checkpoint(out)) is not None and (checkpoint_number(pointed.name) or 0) > step:
            point_last_at(out, resume, step)
        if ((read_state(last) or {}).get("step") or 0) > step:  # consolidated: no optimizer, so no checkpoint_step
            last.unlink()
    for path in [*out.glob("checkpoint-*"), *(p for pattern in outputs for p in out.glob(pattern))]:
        number = checkpoint_number(path.name) if path.name.startswith("checkpoint-") else snapshot_step(path.name)
        if number is not None and number > step:
            if path.is_dir():
                remove_tree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# ---- the folder ----------------------------------------------------------------------
def check_out_folder(out: Path, given: str | None = None) -> None:
    """An output folder that can be created and written: not a file, not under a file, writable. ``given``: the
    setting as the user gave it (:func:`~lomar.train.setting_names.setting_of`; default '--out OUT')."""
    path, given = Path(out), given or f"--out {out}"
    if path.exists() and not path.is_dir():
        raise UsageError(f"{given} is a file, not a folder; pass a folder path")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise UsageError(f"{given} is under {probe}, which is a file; pass a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{given}: {probe} is not writable; pass a folder you can write to")


def remove_stale_temporaries(out: Path, folders: tuple[str, ...] = ()) -> list[Path]:
    """Remove the temporary files (``.NAME.tmp-<pid>-<token>``, ``.NAME.tmp-<pid>``, ``.NAME.tmp``) and
    sharded-checkpoint folders (``checkpoint-<step>.dcp.tmp``) that writers killed mid-write left behind, in ``out``
    and in its sub-folders named in ``folders`` (a task's outputs: segment's ``predictions/``, written a file at a
    time). Only where this process holds the run's lock (:func:`~lomar.train.run_lock.holds_run_lock`): then no live
    writer can own them, but a ``lomar export --to`` this folder running meanwhile (under its export lock), whose
    temporaries stay. A run that went on unlocked (a filesystem without flock) removes none: one may be a live
    writer's, on another machine sharing the folder too, whose PID says nothing here."""
    if not holds_run_lock(out):
        return []
    removed = temporaries(out, folders)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)  # a link, not its target
    return removed


def clear_stale_temporaries(out: Path, name: str, folders: tuple[str, ...]) -> None:
    """:func:`remove_stale_temporaries` of ``out`` and its sub-folders ``folders`` as command ``name`` says it: a note
    of what it removed, or a warning of those it kept where this process holds no file lock."""
    if removed := remove_stale_temporaries(out, folders):
        _say_removed(out, name, removed)
    elif not holds_run_lock(out) and (kept := temporaries(out, folders)):
        log.warning("kept %d temporary file(s) in %s, e.g. %s: without a file lock there a killed writer's cannot be "
                    "told from a live one's (on another machine sharing the folder); delete them once no run or export "
                    "writes into %s", len(kept), out, kept[0].relative_to(out), out)


def clear_killed_writes(out: Path, name: str, files: list[Path], folders: tuple[str, ...] = ()) -> None:
    """Where this process holds ``out``'s lock (no writer of them then lives), remove the temporaries
    (``.NAME.tmp-PID-TOKEN``) a killed command ``name`` left beside its ``files`` and in its sub-folders ``folders`` of
    ``out`` (a file an image), saying so. Only those, unlike a run's :func:`clear_stale_temporaries`: ``out`` may be a
    folder the user shares (predict's DIR, ``--eval-only``'s ``--out``, the working folder), whose other hidden
    temporaries are not lomar's to judge."""
    if not holds_run_lock(out):
        return
    found, own = made_beside_each(files), re.compile(rf"\..+{TEMPORARY_SUFFIX}")
    for folder in (out / sub for sub in folders):
        if folder.is_dir() and not folder.is_symlink():
            with os.scandir(folder) as entries:
                found += sorted(Path(entry.path) for entry in entries if own.fullmatch(entry.name))
    removed = [path for path in found if path.is_file() and not path.is_symlink()]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        _say_removed(out, name, removed)


def _say_removed(out: Path, name: str, removed: list[Path]) -> None:
    print(f"lomar {name}: note: removed {len(removed)} stale temporary file(s) in {out}, "
          f"e.g. {removed[0].relative_to(out)}", file=sys.stderr, flush=True)


def temporaries(out: Path, folders: tuple[str, ...] = ()) -> list[Path]:
    """The temporaries in ``out`` (and in its sub-folders named in ``folders``, never through a link) that
    :func:`remove_stale_temporaries` removes where it may, those of a ``lomar export`` holding the folder's export
    lock left out."""
    found, exporting = [], out.is_dir() and export_running(out)
    for path in sorted(out.iterdir()) if out.is_dir() else ():
        if _TMP.match(path.name) and path.is_file() and not (exporting and is_export_file(path.name)):
            found.append(path)
        elif _SHARDED_TMP.match(path.name) and (path.is_dir() or path.is_symlink()):
            found.append(path)
    for name in folders:
        folder = out / name
        if folder.is_dir() and not folder.is_symlink():
            # a file per validation image: names are matched before a Path is made, and only the matches sorted
            with os.scandir(folder) as entries:
                found += sorted(Path(entry.path) for entry in entries if _TMP.match(entry.name) and entry.is_file())
    return found


def refuse_held_run(out: Path, resume: str | None, overwrite: bool, locked_here: bool = False,
                    eval_only: bool = False, source: str | None = None) -> None:
    """The one check of every command that writes a run folder: a new run does not take over a
    folder that holds one (a checkpoint, or the settings of a run stopped before its first). An ``eval_only``
    command's scores go to a folder of their own: a run's metrics.jsonl is its training's (a resume cuts it back by
    step, `lomar study` reads its last evaluation), whatever --overwrite says. ``source``: the settings file that
    gave ``out``, if one did (the error names its line)."""
    given = as_given("out", str(out), source)
    if eval_only and holds_run(out):
        raise ConfigError(f"{given} holds a run, whose metrics.jsonl is its training's own; pass another --out "
                          f"for the scores")
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 may already have started
    if holds_run(out) and is_main and not resume and not overwrite:
        if not locked_here:  # a live run: say so, not "pass --resume auto", which it would refuse
            RunLock(out, source).acquire(warn=False).release()  # the run's own lock warns, if need be
        raise ConfigError(f"{given} already holds a run; pass --resume auto to continue it, "
                          f"--overwrite to replace it, or another --out")


def prepare_run_folder(config, task, resume: Path | None, step: int, epoch: int, finished: bool = False) -> None:
    """Main process, lock held: a fresh run, or one branched off another folder's checkpoint, clears what an
    earlier run left here (the task's ``outputs`` too); a resume cuts the logs back to its checkpoint;
    ``config.yaml`` is written (a TaskConfig's dump, else the fields). A resume of a run at its end (``finished``:
    nothing to do) in its own folder, not rewinding it, leaves the folder as it is, but for stale temporaries."""
    out, name = Path(config.out), task.name
    source = source_of(config, "out")  # out: r1 in my.yaml, not --out r1
    if resume is None:  # another run may have got here since the config was checked
        refuse_held_run(out, config.resume, config.overwrite, locked_here=True, source=source)
    at_end = finished and resume is not None and not foreign(resume, out) and not config.overwrite
    clear_stale_temporaries(out, name, task.outputs)  # even at the end: a killed final write left them
    if resume is not None:
        print(f"lomar {name}: resumed from {resume} at step {step} (epoch {epoch})", flush=True)
    if at_end:
        return
    if resume is not None and not foreign(resume, out):
        for path in out.glob("checkpoint-*.dcp"):  # a sharded run prunes them, never through a link
            refuse_link(path)
        if config.overwrite:
            remove_newer_checkpoints(out, step, task.outputs, resume, task.final_outputs)
        rewind_best(out, step, resume, name, task.best_metric, task.eval_log)  # the log's record of step: uncut
        if evaluated_after(out / task.eval_log, step):  # each evaluation rewrote them: a dropped step's
            for path in (out / name for name in task.evaluation_outputs):
                remove_tree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        for log_name in {METRICS, task.eval_log}:
            truncate_metrics(out / log_name, step)
    else:
        stale = sorted(p for pattern in (LAST, BEST, LAST_POINTER, METRICS, "checkpoint-*.pt",
                                         "checkpoint-*.dcp", "tb", *task.outputs) for p in out.glob(pattern))
        if stale and not config.overwrite and not holds_run(out):  # no run of ours: files someone else put there
            raise UsageError(f"{as_given('out', str(out), source)} holds {', '.join(p.name for p in stale)}, which a "
                             f"new run would delete, but no run (no config.yaml or checkpoint); pass --overwrite to "
                             f"let it, or another --out")
        for path in stale:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()  # a link, not its target
    text = config.dump() if hasattr(config, "dump") else yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
    atomic_write_text(out / RUN_CONFIG, text)
