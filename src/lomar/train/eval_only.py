"""``--eval-only``: the evaluation of a trained model in one process without a training run (:func:`score_only`),
and the account of a split scored without the images it could not read, which a run's evaluation records too
(:func:`scored_split`; ``--eval-only``'s result line: :func:`over_note`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lomar.checkpoints.file_names import METRICS
from lomar.checkpoints.io import open_in_place
from lomar.data.collate import BadDataTracker
from lomar.errors import UsageError
from lomar.eval.features import check_split, skipped_note
from lomar.train.distributed import DistInfo, join_group
from lomar.train.run_lock import RunLock
from lomar.train.run_state import clear_killed_writes
from lomar.train.runtime import use_threads
from lomar.train.setting_names import source_of
from lomar.train.task import Task, TrainingError
from lomar.values import counted

__all__ = ["score_only", "scored_split", "images_record", "over_note"]


def score_only(config, make_task: type[Task]) -> tuple[Task, dict, Path]:
    """``--eval-only``: the evaluation of ``config.pretrained``, a trained model, in this process without a training
    run: one ``metrics.jsonl`` record (``eval_only``, the file and step scored as ``task.source`` names them, the
    input size, the metrics) and ``task.finish``'s files in ``--out``, locked meanwhile; the record last, so that a
    kill never leaves one without the files of its scoring, which a rerun would log a second time. (The task, its
    metrics, the folder.)"""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--eval-only runs in one process; run it without torchrun")
    _, device = join_group(config.device)  # a device that cannot be used: a one-line error, as a run's
    torch.manual_seed(config.seed)
    use_threads(config.threads)  # as a run's
    with RunLock(Path(config.out), source_of(config, "out")) as lock:
        task = make_task(config, DistInfo(), device)
        # a killed --eval-only's: segment's predictions/ is written an image at a time
        clear_killed_writes(lock.out, task.name, [lock.out / name for name in task.outputs], task.outputs)
        metrics = task.evaluate()
        task.finish(lock.out)
        with open_in_place(lock.out / METRICS, "a") as log:
            log.write(json.dumps({"eval_only": True, "pretrained": config.pretrained, **task.source,
                                  "img_size": config.img_size, **metrics}) + "\n")
    return task, metrics, lock.out


def scored_split(root, total: int, skipped: list, say: bool) -> dict:
    """The metrics record's account of a trained model's evaluation (a run's or ``--eval-only``'s) of the split
    ``root`` of ``total`` images that left out ``skipped`` (the files, each warned of at its first read):
    ``val_images`` (a dict, for the record alone: the log's line and TensorBoard show no such entry), or {} when none
    was. :func:`~lomar.eval.features.check_split` first, as a :class:`TrainingError` (exit 1: what a run finds on
    its way, its checkpoint kept). ``say``: print the skipped note where any was (a run's evaluation, whose epoch
    line follows)."""
    bad = BadDataTracker(total, warn=False)
    bad.update(list(skipped), total)
    try:
        check_split(root, total, total - len(skipped), bad)
    except UsageError as exc:
        raise TrainingError(str(exc)) from None
    if not skipped:
        return {}
    if say:
        print(skipped_note(root, len(skipped)), flush=True)
    return images_record("val", total - len(skipped), len(skipped))


def images_record(split: str, scored: int, skipped: int) -> dict:
    """A record's account of the images of ``split`` ('train', 'val') a score is over, the unreadable ones left out:
    ``{SPLIT_images: {"scored", "skipped"}}``, as a training command's ``metrics.jsonl`` (:func:`scored_split`) and
    knn's and linprobe's --json write it."""
    return {f"{split}_images": {"scored": scored, "skipped": skipped}}


def over_note(root, metrics: dict) -> str:
    """What ``--eval-only``'s result line adds after the scores of ``metrics`` over part of the split ``root``:
    ' over N images (ROOT: K unreadable ...)', or '' over all of it."""
    counts = metrics.get("val_images")
    return f" over {counted(counts['scored'], 'image')} ({skipped_note(root, counts['skipped'])})" if counts else ""
