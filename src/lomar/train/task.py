"""What a training command gives :func:`lomar.train.lifecycle.run`: a :class:`Task`.

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
  epoch were skipped (:class:`SkippedFiles`); ``skips_warned``: the data warned of each (default True),
  else the count does, once per file,
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
  ``scores_end(config)`` (the run evaluates its last step: such a resume runs that evaluation when it is missing),
  ``batches()`` (default: ``iter(train_loader)``), ``batches_per_epoch()``,
  ``set_epoch(epoch, skip_batches, epochs, batches)`` (default: the train loader's sampler's, which can run on
  across epochs: see :class:`EpochStream`),
  ``describe()`` (the start-up line's data and model), ``final_line()`` (appended to "done"),
  ``step_info()``: more scalars for each step's record (name -> float, e.g. the input's settings as tuned),
- main process only: ``begin()`` before the first step, ``saved(path)`` after each checkpoint,
  ``stopped(out)`` after a stop signal.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lomar.checkpoints.file_names import METRICS
from lomar.checkpoints.io import first_non_finite, open_in_place, safe_load
from lomar.data.collate import UNREADABLE_LIMIT, BadDataTracker
from lomar.errors import UsageError
from lomar.eval.features import check_split, skipped_note
from lomar.train.distributed import DistInfo, join_group
from lomar.train.run_lock import RunLock
from lomar.train.run_state import newest_state
from lomar.train.runtime import use_threads
from lomar.train.setting_names import source_of
from lomar.values import counted

__all__ = ["Task", "EpochStream", "Progress", "SkippedFiles", "TrainingError", "steadier", "non_finite_weight",
           "diverged", "check_weights", "preload", "score_only", "scored_split", "over_note"]


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
    best_metric: str | None = None
    sharded = False
    betas = (0.9, 0.999)
    lr_schedule: Callable[..., float] | None = None
    eval_steps: int | None = None
    eval_log = METRICS
    eval_epoch_index = False
    outputs: tuple[str, ...] = ()
    final_outputs: tuple[str, ...] = ()
    curves: tuple[str, ...] = ()
    loss_parts: tuple[str, ...] = ()
    skips_warned = True
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


def score_only(config, make_task: type[Task]) -> tuple[Task, dict, Path]:
    """``--eval-only``: the evaluation of ``config.pretrained``, a trained model, in this process without a training
    run: one ``metrics.jsonl`` record (``eval_only``, the file and step scored as ``task.source`` names them, the
    input size, the metrics) and ``task.finish``'s files in ``--out``, locked meanwhile. (The task, its metrics,
    the folder.)"""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--eval-only runs in one process; run it without torchrun")
    _, device = join_group(config.device)  # a device that cannot be used: a one-line error, as a run's
    torch.manual_seed(config.seed)
    use_threads(config.threads)  # as a run's
    with RunLock(Path(config.out), source_of(config, "out")) as lock:
        task = make_task(config, DistInfo(), device)
        metrics = task.evaluate()
        with open_in_place(lock.out / METRICS, "a") as log:
            log.write(json.dumps({"eval_only": True, "pretrained": config.pretrained, **task.source,
                                  "img_size": config.img_size, **metrics}) + "\n")
        task.finish(lock.out)
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
    return {"val_images": {"scored": total - len(skipped), "skipped": len(skipped)}}


def over_note(root, metrics: dict) -> str:
    """What ``--eval-only``'s result line adds after the scores of ``metrics`` over part of the split ``root``:
    ' over N images (ROOT: K unreadable ...)', or '' over all of it."""
    counts = metrics.get("val_images")
    return f" over {counted(counts['scored'], 'image')} ({skipped_note(root, counts['skipped'])})" if counts else ""


def steadier(config, precision: str | None = None) -> str:
    """What to change after a non-finite loss, in the flags the command has, leaving out what the run already does
    (``precision``: the one it ran in, None if unknown): advice to use fp32 in an fp32 run changes nothing."""
    fields = getattr(config, "__dataclass_fields__", {})
    rates = "/".join(f"--{name}" for name in ("blr", "lr") if name in fields) or "the learning rate"
    clip = getattr(config, "clip_grad", None)
    fixes = [f"lower {rates}", *([f"lower --clip-grad (now {clip:g})" if clip else "set --clip-grad"]
                                 if "clip_grad" in fields else []),
             *(["use --precision fp32"] if precision != "fp32" else [])]
    return f"{', '.join(fixes[:-1])} or {fixes[-1]}" if len(fixes) > 1 else fixes[0]


def diverged(what: str, out: Path, config, precision: str | None, untrained: bool = False) -> TrainingError:
    """The error that stops a run whose loss or weights went non-finite: ``what``, the checkpoint kept, the fix;
    ``untrained``: the loss of the run's first step, before any update, which no lr or clipping can have caused."""
    last = newest_state(Path(out))
    kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
    if untrained:
        fp32 = "" if precision == "fp32" else ", or use --precision fp32"
        fields = getattr(config, "__dataclass_fields__", {})
        scale = " (--layer-scale-init, say)" if "layer_scale_init" in fields else ""
        return TrainingError(f"{what}, before any update (not the lr's doing); {kept}; check the settings that build "
                             f"the model{scale} and the data{fp32}")
    return TrainingError(f"{what}; {kept}; {steadier(config, precision)}")


def check_weights(model: torch.nn.Module, distributed: bool, step: int = 0, out: Path | None = None, config=None,
                  precision: str | None = None, resume: Path | None = None) -> None:
    """:func:`diverged` naming a weight of ``model`` that holds NaN or inf after the update of ``step`` (its loss was
    checked finite): before a save, which would overwrite the last good checkpoint, and before an evaluation, which
    would score it; ``resume``: UsageError, the model loaded from that checkpoint. A collective when ``distributed``."""
    if (bad := non_finite_weight(model, distributed)) is None:
        return
    if resume is not None:
        raise _diverged_checkpoint(resume, bad)
    raise diverged(f"weight {bad} holds NaN or inf after the update of step {step}, whose loss was finite; not saved",
                   out, config, precision)


def _diverged_checkpoint(path: Path, bad: str) -> UsageError:
    return UsageError(f"--resume {path}: its weight {bad} holds NaN or inf (saved after the run diverged); pass "
                      f"--resume {path.parent}/checkpoint-N.pt --overwrite (an earlier one), or another --out")


def preload(path: Path | None, device: torch.device) -> dict | None:
    """The checkpoint file a run resumes from (None: no resume, or a sharded folder, which every rank loads into its
    built shards), read before the run is built: weights that hold NaN or inf (a run that diverged, a damaged file)
    are refused before that cost is paid (a ViT-B's build, its data's listing: 2.5 s of a 2-core CPU at 32 px)."""
    if path is None or path.is_dir():
        return None
    ckpt = safe_load(path, map_location=device)
    model = ckpt.get("model")  # not a dict: the load names what does not fit
    if isinstance(model, dict) and (bad := first_non_finite(model)) is not None:
        raise _diverged_checkpoint(path, bad)
    return ckpt


def non_finite_weight(model: torch.nn.Module, distributed: bool = False) -> str | None:
    """The name of a parameter of ``model`` that holds NaN or inf, None when none does; ``distributed``: a
    collective, any process's (a sharded model's shard: its local part) counts. One host read."""
    named = [(name, p.to_local() if hasattr(p, "to_local") else p) for name, p in model.named_parameters()]
    finite = torch.stack([torch.isfinite(value).all() for _, value in named]).float()
    bad = (finite.numel() - finite.sum()).reshape(1)
    if distributed:
        dist.all_reduce(bad)
    *flags, count = torch.cat([finite, bad]).tolist()
    if not count:
        return None
    return next((name for (name, _), ok in zip(named, flags) if not ok), "a weight of another process's shard")


class SkippedFiles:
    """The files one process skipped (``Task.skipped``), each counted once over the whole run (a checkpoint carries
    them: :meth:`gathered`, :meth:`restore`); more than ``threshold`` of the files the process reads an epoch
    (``batches`` of ``batch_size``) stops the run (:class:`BadDataTracker`'s exact rule). ``warn``: log each file
    once (else the data did)."""

    def __init__(self, batches: int, batch_size: int, warn: bool, threshold: float = UNREADABLE_LIMIT):
        self.tracker = BadDataTracker(batches * batch_size, warn=warn)
        self.batches, self.batch_size, self.threshold = batches, batch_size, threshold

    def count(self, files: list[str]) -> None:
        tracker = self.tracker
        tracker.update(files, self.batch_size)
        try:
            tracker.check(self.threshold)
        except ValueError:  # said in what a user can count: the epoch's reads, not the data's files
            raise TrainingError(f"{counted(tracker.count, 'image')} could not be used so far, over "
                                f"{self.threshold:.0%} of the {tracker.total} an epoch reads ({self.batches} "
                                f"batch(es) of {self.batch_size} per process), e.g. {next(iter(tracker.bad))}; fix "
                                f"or remove them") from None

    def gathered(self, info: DistInfo) -> list[list[str]]:
        """Every rank's skipped files, in rank order, for a checkpoint (a collective under DDP)."""
        # plain str: a dataset's Skipped line (a str subclass) is a global a weights-only load refuses
        mine = [str(file) for file in self.tracker.bad]
        if not info.enabled:
            return [mine]
        files: list = [None] * info.world_size
        dist.all_gather_object(files, mine)
        return files

    def restore(self, ranks: list[list[str]] | None, rank: int) -> None:
        """Go on from this rank's files of a checkpoint's :meth:`gathered` (None: one saved before they were kept)."""
        self.tracker.bad = dict.fromkeys(ranks[rank] if ranks and rank < len(ranks) else ())

    @staticmethod
    def summary(ranks: list[list[str]]) -> str:
        """'N unusable image(s) skipped, e.g. FILE' over the whole run, or '' when none was. ``ranks``: every rank's
        files (:meth:`gathered`), so that the main rank's line counts the run's, not its own alone."""
        files = dict.fromkeys(itertools.chain.from_iterable(ranks))
        return f"{len(files)} unusable image(s) skipped, e.g. {next(iter(files))}" if files else ""


class EpochStream:
    """A task's batches for one epoch after another. Where the task can, one loader iterator serves the
    rest of the run: its workers then prefetch on across an epoch's end. A new iterator per epoch starts
    with every worker empty, and the step waits a whole batch of one worker's decoding at every epoch
    (1.3 s of a 4 s epoch in ``benchmarks/README.md``'s test)."""

    def __init__(self, task: Task):
        self.task, self.batches, self.until = task, None, 0

    def epoch(self, epoch: int, done: int, epochs: int, per_epoch: int) -> Iterator:
        """Batches ``done`` to ``per_epoch`` of ``epoch`` (``epochs`` left in the run, this one included)."""
        if self.batches is None or epoch >= self.until or done:
            self.close()
            self.until = epoch + self.task.set_epoch(epoch, done, epochs, per_epoch)
            self.batches = self.task.batches()
        return itertools.islice(self.batches, per_epoch - done)

    def close(self) -> None:
        """Stop the batches' readers (a batch-ahead thread, the loader's prefetch)."""
        if hasattr(self.batches, "close"):
            self.batches.close()
        self.batches = None
