"""What a training command gives :func:`lomar.train.lifecycle.run`: a :class:`Task`; and
:class:`TrainingError`, what stops its run.

Required of a Task: ``name``, ``model``, ``train_loader``, ``loss(batch)``. Optional (defaults below):
``best_metric``, ``param_groups()``, ``evaluate()``, ``state()``, ``load(state)``, ``finish(out)``, and
- ``net``: set by the lifecycle to the wrapped model (DDP / ``torch.compile``); ``loss`` calls
  ``self.net`` so that DDP all-reduces the gradients,
- ``progress``: set by the lifecycle, the :class:`Progress` (``final`` during the end-of-run ``evaluate``),
- ``loss`` may return None (nothing to learn from the batch); under DDP ``idle_loss(batch)`` then gives
  a loss of the last batch that had one, backpropagated with weight 0, so that every rank joins the
  all-reduce (default: ``loss(batch)`` again),
- ``loss_parts``: names of the loss's components; ``loss`` (and ``idle_loss``) then return a dict of
  exactly these scalars, the loss is their sum, and each step's record holds the mean of each,
- ``skipped(batch)``: the files the batch skipped (default: its ``bad``, as the collates of
  :mod:`lomar.data.collate` give it); a process stops the run once more than 10 % of the files it reads an
  epoch were skipped (:class:`~lomar.train.skipped_files.SkippedFiles`); ``skips_warned``: the data warned of each
  (default True), else the count does, once per file,
- ``crop_size`` and ``sources(batch)``: with a crop size, the run counts the images read whose shorter side is under
  it (every crop of them upscaled) from ``sources`` ((path, height, width) of each image the batch read; default:
  its ``sources``, as :class:`~lomar.data.collate.LabelledBatch` gives them), each once over the run and every
  process, and says so in its final line (:class:`~lomar.train.upscaled_files.UpscaledFiles`),
- ``step_metrics``: names of scalars that ``loss`` also returns in its dict (beside the parts, or beside
  ``"loss"`` when there are none), logged like the parts but not learned from (e.g. an accuracy),
- ``lr_schedule(step, total, warmup, base_lr, min_lr)`` (default warm-up + cosine; a function, not a method: see
  ``lr_schedule_of``): the lr of optimizer step
  ``step``; ``total`` and ``warmup`` from the config (:func:`lomar.train.schedule.run_span`: ``schedule_steps``
  or ``epochs``; ``warmup_steps`` or ``warmup_epochs``), ``min_lr`` the config's (default 0),
- ``eval_steps``: evaluate (and checkpoint) every N optimizer steps instead of at each epoch's end,
- ``sharded`` (FSDP: sharded checkpoints, no DDP), ``betas``, ``eval_log`` (the evaluations' file),
- ``eval_epoch_index``: an epoch-end evaluation record's ``epoch`` is the 0-based index of the epoch
  evaluated (MAE's finetuning log, which `lomar study` reads) instead of the count of epochs done,
  ``outputs`` (names or globs a fresh run clears), ``final_outputs`` (the files ``finish`` writes: a resume that
  finds the run at its end, some of them missing, calls ``finish`` again), ``curves`` (the files drawn from the run's
  log alone, by the static ``draw_curves(config, out)``: such a resume draws a missing one again without the model),
  ``evaluation_outputs`` (files made from the run's latest evaluation, which its checkpoint does not keep: a resume
  that cuts the log back past a later evaluation removes them, as a dropped step's; one that finds the run at its
  end without them evaluates that step again to write them, its record not logged twice, but for ``curves``, which
  it draws from the log),
  ``scores_end(config)`` (the run evaluates its last step: such a resume runs that evaluation when it is missing),
  ``batches()`` (default: ``iter(train_loader)``), ``batches_per_epoch()``,
  ``set_epoch(epoch, skip_batches, epochs, batches)`` (default: the train loader's sampler's, which can run on
  across epochs: see :class:`~lomar.train.epoch_stream.EpochStream`),
  ``describe()`` (the start-up line's data and model), ``final_line()`` (appended to "done"),
  ``step_info()``: more scalars for each step's record (name -> float, e.g. the input's settings as tuned),
- main process only: ``begin()`` before the invocation's first step (``progress.step`` 0 for a new run, the
  checkpoint's on a resume), ``saved(path)`` after each checkpoint,
  ``stopped(out)`` after a stop signal.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lomar.checkpoints.file_names import METRICS

__all__ = ["Task", "Progress", "TrainingError"]


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, too many unreadable images)."""


@dataclass
class Progress:
    epoch: int = 0
    batches_done: int = 0  # of the current epoch, whole optimizer steps only
    step: int = 0
    final: bool = False


def _nothing(self, *args) -> None:
    """A hook's default: nothing to do."""


class Task:
    """What a training command provides; see the module docstring for the optional hooks."""

    name = "task"
    model: torch.nn.Module
    train_loader: torch.utils.data.DataLoader
    best_metric: str | None = None  # the evaluate() metric whose highest value best.pt keeps; None: no best.pt
    sharded = False
    betas = (0.9, 0.999)
    lr_schedule: Callable[..., float] | None = None
    eval_steps: int | None = None
    eval_log = METRICS
    eval_epoch_index = False
    outputs: tuple[str, ...] = ()
    final_outputs: tuple[str, ...] = ()
    evaluation_outputs: tuple[str, ...] = ()
    curves: tuple[str, ...] = ()
    loss_parts: tuple[str, ...] = ()
    skips_warned = True
    crop_size: int | None = None
    step_metrics: tuple[str, ...] = ()
    net: torch.nn.Module  # and ``progress``, ``autocast`` (its precision's context): set by the lifecycle
    load = finish = stopped = begin = saved = _nothing
    evaluate, state, final_line, step_info = (lambda self: {}), (lambda self: {}), (lambda self: ""), (lambda self: {})

    def draws_per_process(self) -> bool:
        """Whether training draws from each process's own random stream (drop path, mixup), not only from streams
        seeded by sample: a resume on another number of processes then goes on statistically, not bit for bit."""
        return True

    @staticmethod
    def draw_curves(config, out: Path) -> None:
        """Draw ``curves`` into ``out`` from its log; called on the class too (a resume at the run's end, unbuilt)."""

    @classmethod
    def scores_end(cls, config) -> bool:
        """Whether a run of ``config`` evaluates its last step (default: the Task has an ``evaluate``); called on the
        class too: a resume at the run's end whose ``eval_log`` lacks that evaluation builds the run to run it."""
        return cls.evaluate is not Task.evaluate

    @classmethod
    def lr_schedule_of(cls, config) -> Callable[..., float] | None:
        """The ``lr_schedule`` a run of ``config`` follows, told unbuilt, so that a resume whose settings go past its
        end is refused before the model, the data and the pretrained weights (:func:`lomar.train.run_end.run_end`);
        default: the class's own (a staticmethod, or None). A Task whose schedule depends on ``config`` overrides
        this and sets ``lr_schedule`` from it."""
        return cls.lr_schedule

    def skipped(self, batch) -> list[str]:
        return list(getattr(batch, "bad", ()))

    def sources(self, batch) -> list[tuple[str, int, int]]:
        return list(getattr(batch, "sources", ()))

    def idle_loss(self, batch) -> torch.Tensor | dict[str, torch.Tensor] | None:
        return self.loss(batch)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def loss(self, batch) -> torch.Tensor | dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def loss_values(self, loss: torch.Tensor | dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to backpropagate, float32 (1 + P + M,) detached copy of it, its P ``loss_parts`` and its M
        ``step_metrics``) of what ``loss`` returned. A copy: under CUDA graphs the loss's memory is reused by the
        next step."""
        if not isinstance(loss, dict):
            return loss, loss.detach().float().reshape(1).clone()
        summed = self.loss_parts or ("loss",)
        if set(loss) != {*summed, *self.step_metrics}:
            raise ValueError(f"the {self.name} loss has parts {sorted(loss)}, not its declared loss_parts "
                             f"{sorted(summed)} and step_metrics {sorted(self.step_metrics)}")
        total = sum(loss[name] for name in summed)
        logged = [loss[name] for name in (*self.loss_parts, *self.step_metrics)]
        return total, torch.stack([total, *logged]).detach().float()

    def batches(self) -> Iterator:
        """The training batches that ``set_epoch`` arranged, in order."""
        return iter(self.train_loader)

    def batches_per_epoch(self) -> int:
        return len(self.train_loader)

    def set_epoch(self, epoch: int, skip_batches: int, epochs: int = 1, batches: int | None = None) -> int:
        """Have ``batches()`` start at batch ``skip_batches`` of ``epoch`` and run on through ``epochs``
        epochs of ``batches`` batches each (default: the loader's); returns how many epochs it will
        run through (a task whose loader cannot go on across an epoch's end returns 1)."""
        size = self.train_loader.batch_size
        self.train_loader.sampler.set_epoch(epoch, skip=skip_batches * size, epochs=epochs,
                                            per_epoch=None if batches is None else batches * size)
        return epochs

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        return f"{len(self.train_loader.dataset)} images, {type(self.model).__name__} {params:.1f}M params"
