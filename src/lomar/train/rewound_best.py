"""The one rule of a resume's ``best.pt`` (finetune, detect, segment): the best evaluation's weights among the steps
the resumed run keeps.

A resume from ``checkpoint-N.pt`` (a rewind, ``--resume OUT/checkpoint-N.pt --overwrite``, or ``--resume auto``
after a kill between ``best.pt`` and the checkpoint that follows it) drops the steps after N, and every reader of the
folder (predict, ``lomar.load_model``, export, ``--pretrained``) takes ``best.pt`` first. A ``best.pt`` of a step
after N goes, as does a damaged one (it cannot be read, so no step it holds is known to be kept, and every reader
refuses it where ``last.pt`` would do). The run carries on from the best score checkpoint N records (the best up to
N, :func:`recorded_best`: :mod:`run_restore` restores it), so the next evaluation that reaches it (a save keeps a
tie's) writes ``best.pt`` again. When checkpoint N is itself that best (its step scored it), ``best.pt`` is written
from it: the same weights, position, task state and scores a save at N wrote: :func:`best_state`, which every save of
``best.pt`` (lifecycle's) takes too.
"""

from __future__ import annotations

import sys
import zipfile
import zlib
from pathlib import Path

from lomar.checkpoints.file_names import BEST
from lomar.checkpoints.io import atomic_save, safe_load
from lomar.train.monitor import metric_text
from lomar.train.run_logs import evaluation_at

__all__ = ["rewind_best", "best_state", "recorded_best"]

# what a training checkpoint holds besides best.pt's model, task state, epoch, step and precision (and best_<metric>)
_TRAINING_ONLY = ("optimizer", "scaler", "batches_done", "rng", "rng_ranks", "steps_per_epoch", "evaluated_step",
                  "skipped_ranks", "upscaled")
_RECORD_ONLY = ("step", "epoch", "partial", "epoch_s")  # an evaluation record's keys besides its metrics


def rewind_best(out: Path, step: int, resume: Path, name: str, metric: str | None, eval_log: str) -> None:
    """Main process, run lock held, before the logs are cut back to ``step``: make ``out/best.pt`` one of the steps a
    resume from ``resume`` (at ``step``) keeps. One of a later step, or one that cannot be read, goes, saying so
    (command ``name``); it is written from ``resume`` when that checkpoint's step scored the best ``metric`` it
    records (its record in ``eval_log``)."""
    best = out / BEST
    if not metric or not best.is_file():
        return
    try:
        dropped = _step_of(best)
    except (OSError, ValueError) as exc:  # every reader refuses it, and the resume cannot tell that it keeps its step
        if (kept := _undamaged(best, exc)) is not None:  # a read refused, maybe for a moment, or a whole file
            print(f"lomar {name}: warning: cannot read {best} ({kept}) to tell its step; left as it is",
                  file=sys.stderr, flush=True)
            return
        dropped = "(damaged: it cannot be read), of no step this resume can tell it keeps"
    else:
        if dropped is None or dropped <= step:  # None: one that holds no step, left as it is
            return
        dropped = f"(step {dropped}), of a step this resume drops"
    ckpt = safe_load(resume, mmap=True) if resume.is_file() else {}  # a sharded run's folder writes no best.pt
    record = evaluation_at(out / eval_log, step) if ckpt.get("evaluated_step") == step else None
    carried = recorded_best(ckpt, metric)
    # the save's own test (lifecycle's _save_files), a NaN's no best
    if record is None or record.get(metric) is None or carried is None or not record[metric] >= carried:
        best.unlink()
        kept = f" up to step {step} ({metric_text(metric, carried)})" if carried is not None else ""
        print(f"lomar {name}: note: removed {best} {dropped}; the next evaluation that reaches the best{kept} writes "
              f"it again", file=sys.stderr, flush=True)
        return
    atomic_save(best_state(ckpt, {k: v for k, v in record.items()
                                  if k not in _RECORD_ONLY and not k.startswith("best_")}), best)


def recorded_best(checkpoint: dict, metric: str | None) -> float | None:
    """The best ``metric`` score a training ``checkpoint`` records up to its step, as it was scored; None where none
    was: no ``metric``, or no evaluation up to its step (its evaluated_step -1), where a best of 0.0 it may hold
    stands for none scored."""
    if not metric or checkpoint.get("evaluated_step") == -1:
        return None
    return checkpoint.get(f"best_{metric}")


def best_state(checkpoint: dict, metrics: dict) -> dict:
    """What ``best.pt`` holds, from the training checkpoint of its step (``model``, ``optimizer`` and
    :meth:`~lomar.train.lifecycle._Run.meta`'s keys) and that step's evaluation ``metrics``: a save's (lifecycle)
    and a rewind's alike."""
    return {**{k: v for k, v in checkpoint.items() if k not in _TRAINING_ONLY and not k.startswith("best_")},
            "metrics": metrics}


def _undamaged(path: Path, exc: BaseException) -> str | None:
    """Why ``path``, which the load ``exc`` failed to read, shows no damage: the system refused the read
    (permissions, an NFS server's error) in that load or in a read of its bytes now, or they are a whole archive
    (torch.save's, every entry's CRC sound) holding no checkpoint lomar reads: what a weights-only load refuses (a
    user's ``torch.save(model)``), or no dict (a tensor, a list).
    None where the file is damaged: cut short, or bytes that are no archive or fail their CRC."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc.strerror or str(exc)
        exc = exc.__cause__ or exc.__context__
    try:
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is None:
                return "a whole archive holding no checkpoint lomar reads"
    except OSError as error:
        return error.strerror or str(error)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError):  # no archive, one cut short, a failed CRC
        pass
    return None


def _step_of(path: Path) -> int | None:
    """The step a ``best.pt`` holds; None when it holds no step. OSError or ValueError where it cannot be read."""
    state = safe_load(path, mmap=True)
    step = state.get("step") if isinstance(state, dict) else None
    return step if isinstance(step, int) else None
