"""What a run tells the user at its start (the start-up line, its notes and warning), at each evaluation (its line
and record) and at its end (the final line, or where a stopped run left its checkpoint). The lines of what the run
does are on stdout, its notes and warnings on stderr (``lomar CMD: note: ...``), so that a program reading stdout gets
the run's own lines alone. ``trainer``: lomar.train.lifecycle's ``_Run``, its state read as it is."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from lomar.checkpoints.file_names import BEST, METRICS
from lomar.train.monitor import input_limit_note, metric_text, resume_hint
from lomar.train.precision import auto_precision, emulated_bf16_notes
from lomar.train.schedule import shortened_warning, warmup_warning
from lomar.values import counted
from lomar.viz.curves import loss_summary

__all__ = ["announce", "record_evaluation", "report_end", "say_notes"]


def say_notes(config, name: str, notes: list[str]) -> None:
    """Each of ``notes`` as ``lomar NAME: note: ...`` on stderr; in a study, whose finetunes share its record of the
    lines said (``config.notes_said``), once a study, not at each cell's evaluation."""
    said = getattr(config, "notes_said", None)
    for line in (f"lomar {name}: note: {note}" for note in notes):
        if said is None or line not in said:
            print(line, file=sys.stderr, flush=True)
            if said is not None:
                said[line] = None


def announce(trainer) -> None:
    """The start-up line: what trains, for how many steps, where, in what precision; then the notes and warning."""
    cfg, task, p = trainer.cfg, trainer.task, trainer.p
    steps = f"steps {p.step + 1}-{trainer.last_step}" if p.step else counted(trainer.last_step, "step")
    print(f"lomar {task.name}: {task.describe()}; {steps} ({trainer.steps_per_epoch} an epoch, batch "
          f"{cfg.batch_size} x accum {trainer.accum} x {trainer.info.world_size} process(es)); out {trainer.out}; "
          f"device {trainer.device}, precision {trainer.precision}", flush=True)
    emulated = emulated_bf16_notes(cfg.precision, trainer.device, auto_precision(cfg, trainer.device))
    say_notes(cfg, task.name, emulated + trainer.notes)  # and a resume's numerics' changes
    if warning := warmup_warning(trainer.last_step, *trainer.schedule, trainer.base_lr, trainer.min_lr,
                                 task.lr_schedule, config=cfg, resumed=p.step > 0):
        print(f"lomar {task.name}: warning: {warning}", file=sys.stderr, flush=True)  # as every warning and note
    if p.step and (was := getattr(cfg, "resumed_end", None)):  # a resume that ends the run sooner than it was set to
        set_end = min((was.get("epochs") or math.inf) * trainer.steps_per_epoch, was.get("max_steps") or math.inf)
        if warning := shortened_warning(trainer.last_step, set_end, *trainer.schedule, trainer.base_lr,
                                        trainer.min_lr, task.lr_schedule, cfg, trainer.steps_per_epoch):
            print(f"lomar {task.name}: warning: {warning}", file=sys.stderr, flush=True)


def report_end(trainer, path: Path, preempted: bool) -> None:
    """The task's end (``stopped`` or ``finish``) and the final line: the checkpoint ``path`` and how to resume a
    ``preempted`` run, else the last losses, skipped files, the best score and an input-bound note."""
    name, out, cfg, task = trainer.task.name, trainer.out, trainer.cfg, trainer.task
    if preempted:
        task.stopped(out)
        print(f"lomar {name}: {trainer.stop.stopped_at(trainer.p.step)}; checkpoint {path}. "
              + resume_hint(name, out, trainer.info.world_size), flush=True)
        return
    task.finish(out)
    losses = loss_summary(out / METRICS, mean_of_last=10)
    skipped = trainer.skipped.summary(trainer.skips)  # every rank's files, as the last save gathered them
    upscaled = trainer.upscaled.summary(trainer.upscales) if trainer.upscaled else ""
    extra, metric = "; ".join(filter(None, [skipped, upscaled, task.final_line()])), task.best_metric
    if metric:
        best = out / BEST
        if best.exists():
            said = f"best {metric_text(metric, trainer.best)} in {best}"
        elif trainer.best > -math.inf:  # a best so far without its best.pt: a resume removed a dropped step's one
            reached = metric_text(metric, trainer.best)
            said = f"no {best.name}: no evaluation since a resume removed it reached {reached}"
        else:
            said = f"no {best.name}: no full epoch scored a {metric} yet"
        extra = ", ".join(filter(None, [said, extra]))
    note = input_limit_note(trainer.monitor.input_waits, getattr(cfg, "workers", None), getattr(cfg, "decode", None))
    say_notes(cfg, name, [note] if note else [])
    print(f"lomar {name}: done at step {trainer.p.step}{f' ({losses})' if losses else ''}; checkpoint {path}"
          + (f"; {extra}" if extra else ""), flush=True)


def record_evaluation(trainer, metrics: dict, seconds: float | None) -> None:
    """The line and the metrics.jsonl record of an evaluation's ``metrics`` at the run's position; ``seconds``: the
    epoch's time, for an evaluation at its end."""
    p, task = trainer.p, trainer.task
    extra = {"partial": True} if p.batches_done else {}
    if seconds is not None:
        extra["epoch_s"] = round(seconds, 2)
    metric = task.best_metric
    if metrics.get(metric) is not None and not p.batches_done:  # None: nothing was scored
        extra[f"best_{metric}"] = max(trainer.best, metrics[metric])
    ended = bool(p.epoch) and not p.batches_done
    index = p.epoch - 1 if ended else p.epoch  # 0-based, as the step lines count epochs
    # the printed line names the epoch as the step lines do, whichever count the record keeps
    at = f"end of epoch {index}" if ended else f"epoch {index}"
    trainer.monitor.evaluation(task.eval_log, p.step, index if task.eval_epoch_index else p.epoch, metrics, extra, at)
