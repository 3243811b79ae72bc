"""A resume that finds its run at its end ("nothing to do"): what it says and writes, and when it can tell so from the
checkpoint's counts alone, before the run is built.

The step, epoch and batches of a checkpoint, with the steps an epoch it was saved with, tell where the resume's
``--max-steps`` / ``--epochs`` end the run. At that end a resume trains nothing; unless an end-of-run file written
from the model (an export: ``Task.final_outputs``) is missing, it then builds neither the model nor the data and
reads no weights: for a ViT-B that build and the checkpoint's full read cost seconds. What the end of a run draws from
its log alone (pretrain's ``loss.png``: ``Task.curves``) is drawn again when missing, built or not, and where an
end-of-run file is missing: a stop there may have come while they were drawn, leaving those of an earlier checkpoint.
A run that scores its end (``Task.scores_end``) and was stopped between its last checkpoint and that evaluation (the
checkpoint is saved first) is built to run it: its ``eval_log`` record of the last step, or the checkpoint's
``evaluated_step``, says it was done.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from lomar.checkpoints.file_names import CONFIG_NAME, METRICS
from lomar.lr_schedule import peak_lr
from lomar.train.distributed import any_rank
from lomar.train.monitor import Monitor
from lomar.train.run_logs import evaluation_logged
from lomar.train.run_state import foreign, save_on_main_rank
from lomar.train.schedule import run_span, schedule_overrun
from lomar.train.settings_resume import resumed_past_end

__all__ = ["RunEnd", "run_end", "last_step", "config_overrun", "answer_at_end", "missing_outputs", "evaluation_missing",
           "unwritten_evaluation", "evaluate_end"]


class RunEnd(NamedTuple):
    step: int
    epoch: int
    steps_per_epoch: int


def missing_outputs(names: tuple[str, ...], out: Path, step: int) -> list[str]:
    """Those of ``names`` (a task's ``final_outputs``) that ``out`` lacks, or all of them when the export's
    ``config.json`` there is of another step than ``step`` (or does not read): a run extended past an earlier end and
    stopped between its new last checkpoint and its new export keeps the earlier export, which would stay for good."""
    missing = [name for name in names if not (out / name).exists()]
    if CONFIG_NAME not in names or CONFIG_NAME in missing:
        return missing
    try:
        saved = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return list(names)
    return list(names) if saved is not None and saved != step else missing  # None: an export that kept no step


def evaluation_missing(task, config, out: Path, step: int, evaluated_step) -> bool:
    """Whether the run at its last ``step`` lacks the evaluation of that step that ``task`` (or its class) makes for
    ``config``: neither the checkpoint's ``evaluated_step`` nor a record of ``task.eval_log`` says it was made."""
    return evaluated_step != step and task.scores_end(config) and not evaluation_logged(Path(out) / task.eval_log,
                                                                                          step)


def unwritten_evaluation(task, out: Path) -> list[str]:
    """Those of ``task``'s (or its class's) ``evaluation_outputs`` that ``out`` lacks and its log cannot draw again
    (its ``curves``): only an evaluation of the step writes them (a rewind removed a dropped step's, or they were
    deleted)."""
    return [name for name in task.evaluation_outputs if name not in task.curves and not (Path(out) / name).exists()]


def last_step(config, steps_per_epoch: int) -> float:
    """The step where ``config``'s ``--max-steps`` or ``--epochs`` of ``steps_per_epoch`` end the run, the earlier."""
    return min(config.epochs * steps_per_epoch, config.max_steps or math.inf)


def run_end(config, task_class, point, out: Path, world_size: int) -> RunEnd | None:
    """Where the checkpoint resumed (``point``: what was read of it, a :class:`~lomar.train.run_resume.ResumePoint`)
    stands when it is the end of the run the settings make, in ``out`` its own folder (a resume into another, or with
    ``--overwrite``, prepares the folder as any resume does) and nothing the model writes at the end is missing; None
    otherwise, and wherever only the built run can tell: a checkpoint of another process count (which goes on where
    the global batch is kept: :func:`~lomar.train.process_count.other_processes`), one that does not read. ValueError
    (:func:`resumed_past_end`) where its counts put it past that end, or
    (:func:`~lomar.train.schedule.schedule_overrun`) that end past the lr schedule's that ``task_class`` tells unbuilt
    (:meth:`~lomar.train.task.Task.lr_schedule_of`): settings refusals, made before the model is built and its weights
    or pretrained encoder read."""
    if point is None or point.meta is None:
        return None
    ckpt = point.meta
    step, epoch, done, ranks = (ckpt.get(k) for k in ("step", "epoch", "batches_done", "rng_ranks"))
    if not all(isinstance(v, int) for v in (step, epoch, done)) or ranks is not None and len(ranks) != world_size:
        return None
    per_epoch = ckpt.get("steps_per_epoch")  # saved since; before, an epoch's whole steps tell it
    if not isinstance(per_epoch, int) and epoch:
        per_epoch = (step - done // config.accum_steps) // epoch
    if not isinstance(per_epoch, int) or per_epoch <= 0:
        return None
    last = last_step(config, per_epoch)
    if step > last:
        raise ValueError(resumed_past_end(step, last, config, per_epoch))
    schedule = task_class.lr_schedule_of(config)  # the check lifecycle's _Run makes, made before the build
    # --data may have changed since (the built run goes on with its own steps an epoch): refused unbuilt only where any
    # count would be. Fewer steps an epoch than those with which --epochs reach --max-steps or the schedule's end are
    # refused (the run stops before), more go on at least as far: the refusal at that fewest is one at any
    if overrun := config_overrun(config, per_epoch, world_size, schedule):
        fewest = math.ceil(min(config.schedule_steps, config.max_steps) / config.epochs) if config.max_steps else 1
        if config_overrun(config, fewest, world_size, schedule):  # an overrun has schedule_steps
            raise ValueError(overrun)
    if config.overwrite or foreign(point.path, out) or missing_outputs(task_class.final_outputs, Path(out), step) or \
            evaluation_missing(task_class, config, out, step, ckpt.get("evaluated_step")) or \
            unwritten_evaluation(task_class, out):
        return None
    return RunEnd(step, epoch, per_epoch) if step == last else None


def config_overrun(config, per_epoch: int, world_size: int, schedule) -> str | None:
    """:func:`~lomar.train.schedule.schedule_overrun` of a run of ``config`` at ``per_epoch`` steps an epoch, on
    ``world_size`` processes, following ``schedule`` (a Task's ``lr_schedule``)."""
    return schedule_overrun(last_step(config, per_epoch), *run_span(config, per_epoch), peak_lr(config, world_size),
                            getattr(config, "min_lr", 0.0), schedule, config, per_epoch)


def answer_at_end(task, out: Path, step: int, last_step: int, steps_per_epoch: int, config, is_main: bool,
                  device: torch.device, trainer=None) -> int:
    """Say that the run at ``step`` ends at ``last_step`` and write the end-of-run files it lacks (a full disk cut
    its end short, or they were deleted): ``task.finish`` those of the model, ``task.draw_curves`` those of the log.
    ``task``: the built Task, or its class when :func:`run_end` found nothing of the model's missing. ``trainer``:
    the built run (lomar.train.lifecycle's ``_Run``), which first evaluates the step if that evaluation is missing
    (the main process decides: every one joins it). Exit code 0."""
    score = trainer is not None and any_rank(is_main and evaluation_missing(
        task, config, out, step, trainer.evaluated_step), device)
    missing = [] if trainer is None else missing_outputs(task.final_outputs, out, step)  # unbuilt: run_end found none
    # the step's evaluation is logged, its files are not: made again for them alone
    unwritten = unwritten_evaluation(task, out) if trainer is not None and not score and is_main else []
    rewrite = trainer is not None and not score and any_rank(bool(unwritten), device)  # every process: collective
    logged = (out / METRICS).is_file()
    curves = [name for name in task.curves if not (out / name).exists()] if logged else []
    # an end cut short after its last checkpoint may have been stopped while it drew them: a curve there can be an
    # earlier checkpoint's, without the last steps
    drawn = list(task.curves) if missing and logged else curves
    if is_main:
        print(f"lomar {task.name}: nothing to do, the run is at step {step}; it ends at {last_step} "
              f"({f'--max-steps {config.max_steps} or ' if config.max_steps else ''}--epochs {config.epochs} of "
              f"{steps_per_epoch} steps{', whichever ends first' if config.max_steps else ''})"
              + (f"; evaluating step {step}, which its end did not" if score else "")
              + (f"; writing its missing {', '.join(missing + unwritten + curves)}" if missing or unwritten or curves
                 else ""), flush=True)
    if score:
        _score_end(trainer)
    elif rewrite:  # every process: an evaluation is collective
        trainer.task.evaluate()
    # the end of the run was cut short after its last checkpoint; or its last evaluation ran just now: what finish
    # writes from it (segment's per_class.md) was the earlier end's or none
    if missing or score or rewrite:
        save_on_main_rank(lambda: task.finish(out), is_main, device)
    if drawn and is_main:
        try:
            task.draw_curves(config, out)
        except Exception as exc:  # noqa: BLE001 - a figure must never fail a run, as during it
            print(f"lomar {task.name}: could not draw {', '.join(drawn)}: {exc}", file=sys.stderr)
    return 0


def evaluate_end(trainer) -> None:
    """The run's last evaluation, made after its last checkpoint (``trainer``: lomar.train.lifecycle's ``_Run``, its
    monitor open), logged, and kept in ``best.pt`` when it is the best of a step-evaluated run."""
    trainer.p.final = True
    metrics = trainer._evaluate()
    if metrics and trainer.task.eval_steps:
        trainer.save(metrics)


def _score_end(trainer) -> None:
    """:func:`evaluate_end` for a resume that finds it missing: the run at its end opened no monitor."""
    trainer.monitor = Monitor(trainer.out, trainer.info.is_main, trainer.last_step, trainer.cfg.log_every,
                              trainer.task.name, trainer.p.step)
    try:
        evaluate_end(trainer)
    finally:
        trainer.monitor.close()
