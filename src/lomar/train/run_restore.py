"""A resume's restore of the built run (lomar.train.lifecycle's ``_Run``) from its checkpoint: weights, optimizer,
scaler, position, best score, skipped files and RNG states, a file's or a sharded folder's alike, with the notes a
change of precision or of the process count leaves."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from lomar.checkpoints.io import mismatch, safe_load
from lomar.errors import UsageError
from lomar.train.divergence import check_weights
from lomar.train.encoder_settings import rebuilt_encoder_config
from lomar.train.fsdp import load_sharded
from lomar.train.process_count import other_processes, other_processes_note
from lomar.train.rewound_best import recorded_best
from lomar.train.rng import restore_rng_states
from lomar.train.run_resume import numerics_notes
from lomar.train.settings_resume import resumed_past_end

__all__ = ["restore"]


def restore(trainer, path: Path, ckpt: dict | None, meta: dict | None, task_loaded: bool = False) -> None:
    """Resume ``trainer`` (lifecycle's ``_Run``) from ``path``: ``ckpt`` its full read
    (:func:`~lomar.train.divergence.preload`), None for a sharded folder, whose ``meta`` (its meta.pt, as the resume
    point read it; None: not read) every rank loads with its shards. ``task_loaded``: the Task loaded it while it was
    built (:func:`~lomar.train.task_resume.load_resumed`)."""
    task, cfg, info, p = trainer.task, trainer.cfg, trainer.info, trainer.p
    if ckpt is None and meta is None:
        meta = safe_load(path / "meta.pt")
    if not task_loaded:
        task.load(meta if ckpt is None else ckpt)  # first: its refusal names the cause
    other = other_processes(meta if ckpt is None else ckpt, cfg.batch_size, trainer.accum, info.world_size)
    if ckpt is None:  # a sharded folder (a file's ckpt comes from preload): every rank loads its shards
        ckpt = load_sharded(task.model, trainer.optimizer, path, meta)
        check_weights(task.model, info.enabled, resume=path)  # a file's are checked as it is read
    else:
        try:
            task.model.load_state_dict(ckpt["model"])
            trainer.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, RuntimeError, KeyError) as exc:
            # a model rebuilt from the checkpoint read no --pretrained: only one kept without its architecture did
            reread = getattr(cfg, "pretrained", None) and not rebuilt_encoder_config(cfg)
            read = "the data and --pretrained" if reread else "the data"
            raise UsageError(f"--resume {path} does not fit this run: {mismatch(exc)}; resume with {read} it "
                             f"started with, or start a new run with another --out") from None
    if ckpt.get("scaler"):  # {}: a run not in fp16, whose scaler a switch to fp16 starts afresh
        trainer.scaler.load_state_dict(ckpt["scaler"])
    p.step, p.epoch, p.batches_done = ckpt["step"], ckpt["epoch"], ckpt["batches_done"]
    trainer.notes = numerics_notes(ckpt, trainer.precision, cfg.precision, trainer.device)
    skipped = ckpt.get("skipped_ranks")
    if other:  # the same samples in the same steps: what a rank counts is a step's micro-batches
        p.batches_done = ckpt["batches_done"] // other[1] * trainer.accum
    if other is not None and other[0] != info.world_size:
        skipped = [list(dict.fromkeys(itertools.chain(*skipped)))] * info.world_size if skipped else skipped
        trainer.notes.append(other_processes_note(other[0], info.world_size, p.step, cfg.batch_size, trainer.accum,
                                                  task.draws_per_process(), getattr(task, "iterable", False),
                                                  task.sharded))
    best = recorded_best(ckpt, task.best_metric)
    trainer.best = -math.inf if best is None else best  # None: no evaluation scored yet
    trainer.evaluated_step = ckpt.get("evaluated_step")  # None: a checkpoint that does not hold it
    trainer.skipped.restore(skipped, info.rank)
    if trainer.upscaled:
        trainer.upscaled.restore(ckpt.get("upscaled"))
    restore_rng_states(ckpt, info, trainer.device, cfg.seed)  # last: building the run drew from them
    if p.step > trainer.last_step:  # run_end could not tell: an old checkpoint, or data of shorter epochs
        raise ValueError(resumed_past_end(p.step, trainer.last_step, cfg, trainer.steps_per_epoch))
