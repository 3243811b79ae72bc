"""The optimisation recipe as pure functions: a run's learning-rate schedule from its settings (its span, its peak,
what to tell a run that stops inside its warm-up or runs past its end; the curves themselves:
:mod:`lomar.lr_schedule`) and the weight-decay groups."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lomar.lr_schedule import lr_at
from lomar.train.setting_names import setting_named

__all__ = ["schedule_span", "run_span", "warmup_warning", "shortened_warning", "schedule_overrun", "param_groups"]


def schedule_span(steps_per_epoch: int, epochs: float, warmup_epochs: float,
                  schedule_steps: int | None = None) -> tuple[float, float]:
    """(total, warm-up) length of the lr schedule in optimizer steps.

    The recipe states both in epochs; ``schedule_steps`` lays the same shape (the recipe's
    warm-up share, ``warmup_epochs / epochs``) over that many steps instead, for runs that stop
    at ``--max-steps`` long before the recipe's epochs would end.
    """
    if schedule_steps is None:
        return epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    return float(schedule_steps), schedule_steps * (warmup_epochs / epochs if epochs else 0.0)


def warmup_warning(last_step: int, total_steps: float, warmup_steps: float, base_lr: float, min_lr: float = 0.0,
                   schedule: Callable[..., float] | None = None, config=None, resumed: bool = False) -> str | None:
    """What to tell a run that will stop inside its warm-up (its lr never reaches the recipe's peak);
    ``schedule`` is the run's (None: :func:`lr_at`), rising through the warm-up, so its last step's lr is the run's
    highest. The fix named follows what set the schedule: the run's ``config`` (:func:`run_span`), ``resumed``.
    A new run whose ``--warmup-steps`` :func:`run_span` cut to the schedule's length is told both numbers: all of it
    is warm-up, the decay never starts (even where it ends with its warm-up, which is not otherwise warned)."""
    asked = getattr(config, "warmup_steps", None)
    cut = asked is not None and asked > warmup_steps and not resumed  # a resumed run was told at its start
    if last_step < 1 or last_step >= warmup_steps and not cut:
        return None
    peak = (schedule or lr_at)(last_step - 1, total_steps, warmup_steps, base_lr, min_lr)
    if peak >= base_lr * (1 - 1e-9):
        return None
    if cut:
        # a run stopping before its schedule's end (--max-steps below --schedule-steps or --epochs') must also
        # finish its warm-up before it stops, or the warm-up suggested would be cut by the stop in turn
        stops = f", and this run stops at step {last_step}" if last_step < total_steps else ""
        below = min(last_step, math.floor(total_steps))
        return (f"--warmup-steps {asked} is longer than this run's {total_steps:g}-step lr schedule: it warms up over "
                f"all of it and never decays{stops}: {_highest(peak, base_lr)}; lower "
                f"--warmup-steps below {below} (e.g. {below // 10})")
    return (f"this run stops at step {last_step}, inside its {warmup_steps:g}-step warm-up: "
            f"{_highest(peak, base_lr)}; {_warmup_fix(config, warmup_steps, resumed)}")


def _highest(lr: float, base_lr: float) -> str:
    """The highest lr of a run its warm-up outlasts (its last step's), told apart from the peak lr it never reaches:
    "peaks at" both would read as one lr."""
    return f"the lr rises only to {lr:.3g}, at its last step, short of the peak lr {base_lr:.3g}"


def _warmup_fix(config, warmup_steps: float, resumed: bool) -> str:
    if resumed:  # its schedule is the checkpoint's
        return (f"a resumed run keeps its schedule: pass --max-steps {math.ceil(warmup_steps)} or more to finish the "
                f"warm-up")
    if getattr(config, "warmup_steps", None) is not None:  # detect, segment: a warm-up of so many steps
        return "lower --warmup-steps to at most --max-steps"
    if getattr(config, "schedule_steps", None) is not None:  # given, or kept from the run's config.yaml
        return ("lower --schedule-steps (the schedule's length, which --max-steps sets when neither it nor --epochs "
                "is given), or lower --warmup-epochs")
    return (f"drop {setting_named(config, 'epochs', 'from')} to lay the schedule over --max-steps, or lower "
            f"{setting_named(config, 'warmup_epochs')}")


def shortened_warning(last_step: int, set_end: float, total_steps: float, warmup_steps: float, base_lr: float,
                      min_lr: float = 0.0, schedule: Callable[..., float] | None = None, config=None,
                      steps_per_epoch: int = 0) -> str | None:
    """What to tell a resumed run whose ``--max-steps`` or ``--epochs`` (``config``'s, at ``steps_per_epoch``) end it at
    ``last_step``, before ``set_end`` where the run was set to end and before its lr schedule's end: the schedule is
    the run's own (``schedule_steps`` is fixed, the end run-control), so it stops with the lr mid-schedule, not
    annealed. None where it ends at or past either, or below the peak inside its warm-up (:func:`warmup_warning`'s;
    BEiT's whole-step warm-up peaks up to a step before ``warmup_steps``, where that says nothing)."""
    if last_step >= min(set_end, total_steps):
        return None
    lr = (schedule or lr_at)(last_step - 1, total_steps, warmup_steps, base_lr, min_lr)
    if last_step < warmup_steps and lr < base_lr * (1 - 1e-9):
        return None
    by_steps = config.max_steps == last_step
    by = f"{setting_named(config, 'max_steps')} {last_step}" if by_steps else \
        f"{setting_named(config, 'epochs')} {config.epochs}"
    end = math.floor(min(set_end, total_steps))
    fix = f"--max-steps {end}" if by_steps else f"--epochs {math.ceil(end / steps_per_epoch)}"
    return (f"{by} ends this resumed run at step {last_step}, before step {math.floor(set_end)} where it was set to "
            f"end; its lr schedule is the run's own, laid when it began (a resume keeps it), and ends at step "
            f"{total_steps:g}: the run stops with the lr at {lr:.3g} ({lr / base_lr:.2g} x the peak {base_lr:.3g}), "
            f"not annealed; resume with {fix} to go on to step {end}, or start a new run (another --out) with "
            f"{'--max-steps' if by_steps else '--epochs'} {last_step if by_steps else config.epochs} to lay a "
            f"schedule over that length")


def schedule_overrun(last_step: int, total_steps: float, warmup_steps: float, base_lr: float, min_lr: float = 0.0,
                     schedule: Callable[..., float] | None = None, config=None,
                     steps_per_epoch: int = 0) -> str | None:
    """What stops a run that would go on past its lr schedule's end (``schedule_steps`` fixed by a first
    ``--max-steps``, then a larger one on resume): every step past it would train at the lr the run's ``schedule``
    (None: :func:`lr_at`) ends at, ``min_lr`` for a cosine, a share of ``base_lr`` for detect's steps; or, given the
    run's ``config`` and ``steps_per_epoch``, one whose ``--epochs`` end it before the ``--max-steps`` its schedule
    was laid over: it would stop with the lr mid-schedule, never annealed."""
    max_steps = getattr(config, "max_steps", None)
    if max_steps and last_step < min(max_steps, total_steps):
        return (f"--max-steps {max_steps} is past the end of --epochs {config.epochs} (step {last_step}, at "
                f"{steps_per_epoch} steps an epoch), where the run would stop with its {total_steps:g}-step lr "
                f"schedule (schedule_steps) unfinished, the lr never annealed; pass --epochs "
                f"{math.ceil(max_steps / steps_per_epoch)} --max-steps {max_steps} --schedule-steps {total_steps:g} "
                f"to train all {max_steps} steps, or --max-steps {last_step}")
    if last_step <= total_steps:
        return None
    fix = ("start a new run (another --out) whose --max-steps or --schedule-steps covers the steps you want"
           if getattr(config, "resume", None) else f"raise --schedule-steps to {last_step}")  # a new run: this --out
    end = (schedule or lr_at)(math.ceil(total_steps), total_steps, warmup_steps, base_lr, min_lr)
    # the lr of the schedule's last step: below the end's where the warm-up ends with the schedule
    last = (schedule or lr_at)(math.ceil(total_steps) - 1, total_steps, warmup_steps, base_lr, min_lr)
    lr = f"min_lr {min_lr:g}" if math.isclose(end, min_lr) else \
        f"lr {end:.3g} ({end / base_lr:.3g} x the peak lr {base_lr:.3g}, where its schedule ends)"
    if end > last * (1 + 1e-9):  # a warm-up as long as the schedule: the run's warning named the lower lr
        lr = (f"the peak lr {end:.3g}, which its warm-up reaches only where its schedule ends: its last step, "
              f"{math.ceil(total_steps)}, trains at {last:.3g}")
    return (f"this run's lr schedule ends at step {total_steps:g} (schedule_steps), but it would go on to step "
            f"{last_step}: steps {math.floor(total_steps) + 1}-{last_step} would all train at {lr}; "
            f"end it at --max-steps {math.floor(total_steps)}, or {fix}")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The original decay rule: no decay for biases and 1-D parameters, decay for the rest
    (so the 3-D cls/mask tokens and RPE tables are decayed, SPEC §4)."""
    decay, no_decay = [], []
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()  # e.g. BEiT's cls_token
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim == 1 or name.endswith(".bias") or name in skip else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def run_span(config, steps_per_epoch: int) -> tuple[float, float]:
    """(total, warm-up) of a run's lr schedule in optimizer steps, from its config: ``schedule_steps`` or
    ``epochs``; the warm-up in ``warmup_steps`` (at most the total) or, as the pretraining and finetuning
    recipes state it, in ``warmup_epochs`` (:func:`schedule_span`)."""
    schedule_steps = getattr(config, "schedule_steps", None)
    if getattr(config, "warmup_steps", None) is None:
        return schedule_span(steps_per_epoch, config.epochs, config.warmup_epochs, schedule_steps)
    total = float(schedule_steps or config.epochs * steps_per_epoch)
    return total, float(min(config.warmup_steps, total))
