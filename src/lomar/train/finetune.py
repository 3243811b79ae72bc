"""``lomar finetune``: end-to-end classification finetuning with the original recipe (SPEC §3).

timm supplies the recipe's pieces: the RandAugment / random-erasing transform
(``create_transform``), Mixup/CutMix with label smoothing (``Mixup``), the soft-target loss
and the layer-wise lr decay parameter groups (``param_groups_layer_decay``, driven by
``VisionTransformer.group_matcher``: stem = layer 0, block i = layer i+1, final norm and head
= top layer, scaled decay^(top − layer)). The lr follows ``lomar.train.schedule.lr_at`` per
iteration: linear warm-up, cosine to ``--min-lr``. Checkpoints, resume (with the RNG state,
so a resumed run continues exactly when loading runs in the training process, ``--workers 0``),
the run-folder lock and preemption are those of pretraining (``lomar.train.run_state``).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from lomar.checkpoints.io import atomic_write_text, safe_load
from lomar.data.classify import classification_transforms, eval_crop_ratio
from lomar.data.samplers import EpochSampler
from lomar.errors import UsageError
from lomar.train.distributed import DistInfo, cleanup_distributed, init_distributed
from lomar.train.finetune_config import FinetuneConfig, dump_finetune_config, encoder_layout, split_roots
from lomar.train.preemption import StopFlag, any_rank_stopping, ignore_stop_signals, shut_down_workers
from lomar.train.run_state import (
    RunLock,
    autocast_factory,
    check_no_rewind,
    find_resume_checkpoint,
    remove_stale_temporaries,
    resolve_precision,
    rng_state,
    save_checkpoint,
    save_on_main_rank,
    save_state,
    set_rng_state,
    truncate_metrics,
)
from lomar.train.runtime import default_threads, fast_adamw
from lomar.train.schedule import lr_at, schedule_span, warmup_warning
from lomar.train.settings_resume import refuse_held_run

__all__ = ["finetune", "classification_transforms", "eval_crop_ratio", "evaluate", "FinetuneRun"]


class FinetuneError(RuntimeError):
    """The run cannot go on (a non-finite loss)."""


def _loaders(config: FinetuneConfig, train_root: Path, val_root: Path,
             info: DistInfo) -> tuple[DataLoader, DataLoader, list[str]]:
    from lomar.data.collate import collate_labelled, collate_labelled_refill
    from lomar.data.folder import LabelledImageFolder  # skips unreadable images instead of crashing

    train_tf, val_tf = classification_transforms(config.img_size, config.aa, config.reprob, config.crop_scale)
    try:
        train_set, val_set = LabelledImageFolder(train_root, train_tf), LabelledImageFolder(val_root, val_tf)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if train_set.classes != val_set.classes:
        raise UsageError(f"train and val class folders differ: {train_set.classes} vs {val_set.classes}")
    sampler = EpochSampler(len(train_set), config.seed, info.rank, info.world_size, keys=False)
    # Each rank scores a disjoint slice of val (no padding duplicates), counts are summed.
    val_part = Subset(val_set, range(info.rank, len(val_set), info.world_size))
    workers = config.workers
    # Own generators: creating an iterator then draws nothing from the global torch stream,
    # which the augmentation uses and the checkpoint saves (exact resume).
    common = dict(num_workers=workers, persistent_workers=workers > 0,
                  worker_init_fn=ignore_stop_signals if workers > 0 else None)
    train = DataLoader(train_set, config.batch_size, sampler=sampler, drop_last=True,
                       collate_fn=collate_labelled_refill,
                       generator=torch.Generator().manual_seed(config.seed + info.rank), **common)
    val = DataLoader(val_part, config.batch_size, collate_fn=collate_labelled, generator=torch.Generator(),
                     **common)
    if len(train) < config.accum_steps:
        raise UsageError(f"the training split ({len(train_set)} images over {info.world_size} process(es)) "
                         f"cannot fill one step of {config.accum_steps} batch(es) of {config.batch_size}; "
                         f"lower --batch-size or --accum-steps")
    return train, val, train_set.classes


@torch.no_grad()
def evaluate(model, loader, device: torch.device, info, autocast) -> dict[str, float]:
    """Top-1 / top-5 accuracy in [0, 1] over the whole validation set (all ranks)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, count
    for images, targets in loader:
        with autocast():
            logits = model(images.to(device))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == targets.to(device)[:, None]
        totals += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(targets), device=device)])
    if info.enabled:
        dist.all_reduce(totals)
    model.train(was_training)
    count = max(float(totals[2]), 1.0)
    return {"top1": float(totals[0]) / count, "top5": float(totals[1]) / count}


class FinetuneRun:
    """One finetuning run: model, optimizer, loaders, position (epoch, batches done, step)."""

    def __init__(self, config: FinetuneConfig, info: DistInfo, device: torch.device):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import param_groups_layer_decay
        from torch.nn.parallel import DistributedDataParallel

        from lomar.eval.features import load_pretrained_encoder

        self.config, self.info, self.device, self.out = config, info, device, Path(config.out)
        torch.set_num_threads(config.threads or default_threads())
        # Per-rank streams for augmentation and mixup (timm draws from numpy / random); DDP
        # broadcasts rank 0's initial weights, so the new head is the same everywhere.
        torch.manual_seed(config.seed + info.rank)
        np.random.seed(config.seed + info.rank)
        random.seed(config.seed + info.rank)
        self.train_loader, self.val_loader, self.classes = _loaders(config, *split_roots(config), info)
        try:
            self.model = load_pretrained_encoder(config.pretrained, num_classes=len(self.classes),
                                                 global_pool=config.global_pool, img_size=config.img_size,
                                                 drop_path=config.drop_path, **encoder_layout(config))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if info.is_main:
            print(f"lomar finetune: {self.model.load_report.summary()}", flush=True)
        self.model.set_grad_checkpointing(config.grad_checkpointing)
        self.model.to(device)
        self.base_lr = config.blr * config.batch_size * config.accum_steps * info.world_size / 256
        groups = param_groups_layer_decay(self.model, config.weight_decay, self.model.no_weight_decay(),
                                          layer_decay=config.layer_decay)
        self.optimizer = fast_adamw(groups, lr=self.base_lr)
        self.mixup = None
        if config.mixup > 0 or config.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                               label_smoothing=config.smoothing, num_classes=len(self.classes))
            self.criterion = SoftTargetCrossEntropy()  # mixup already smoothed the targets
        elif config.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(config.smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()
        self.net = DistributedDataParallel(self.model) if info.enabled else self.model
        self.autocast = autocast_factory(resolve_precision(config.precision, device), device)
        # An epoch is whole optimizer steps: a tail that cannot fill --accum-steps batches is left out.
        self.steps_per_epoch = len(self.train_loader) // config.accum_steps
        self.batches_per_epoch = self.steps_per_epoch * config.accum_steps
        self.schedule = schedule_span(self.steps_per_epoch, config.epochs, config.warmup_epochs, config.schedule_steps)
        self.epoch, self.skip, self.step, self.best = 0, 0, 0, 0.0
        self.losses: list[float] = []  # of the batches of the optimizer step in progress
        self.stop = StopFlag()
        self.log = None

    # ---- checkpoints ---------------------------------------------------------------
    def load(self, path: Path) -> None:
        try:
            ckpt = safe_load(path, map_location=self.device)
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"--resume {path} does not fit this run: {first}") from None
        self.epoch, self.skip, self.step = ckpt["epoch"], ckpt["batches_done"], ckpt["step"]
        self.best = ckpt["best_top1"]
        if "rng" in ckpt:  # last: building the run above drew from the streams
            set_rng_state(ckpt["rng"])

    def save(self, metrics: dict | None) -> None:
        """``last.pt`` at the current position; ``best.pt`` too when ``metrics`` (a finished
        epoch's) are the best so far."""
        save_on_main_rank(lambda: self._save_files(metrics), self.info.is_main, self.device)

    def _save_files(self, metrics: dict | None) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                 "batches_done": self.skip, "step": self.step, "best_top1": self.best,
                 "config": self.model.config.to_dict(), "num_classes": len(self.classes), "classes": self.classes,
                 "settings": self.config.to_dict(), "rng": rng_state(), "format": "lomar-finetune-1",
                 "global_pool": self.config.global_pool}
        if metrics is not None and metrics["top1"] >= self.best:
            self.best = state["best_top1"] = metrics["top1"]
            save_state({k: state[k] for k in ("model", "config", "num_classes", "classes", "epoch", "step",
                                              "format", "global_pool")} | {"metrics": metrics}, self.out / "best.pt",
                       previous=self.out / "last.pt")
        save_checkpoint(state, self.out)

    # ---- training ------------------------------------------------------------------
    def run(self) -> int:
        """Train to ``--max-steps`` / ``--epochs`` or until a stop signal; the exit code."""
        cfg = self.config
        total = cfg.epochs * self.steps_per_epoch
        warning = warmup_warning(min(total, cfg.max_steps) if cfg.max_steps else total, self.schedule[1], self.base_lr)
        if warning and self.info.is_main:
            print(f"lomar finetune: warning: {warning}", flush=True)
        self.log = open(self.out / "metrics.jsonl", "a") if self.info.is_main else None
        try:
            self.stop.install()
            while self.epoch < cfg.epochs:
                tick = time.perf_counter()
                outcome = self._train_epoch()
                if outcome == "preempted":
                    # Checkpoint where we are and leave; a resume re-enters this epoch (and evaluates
                    # it if it was complete), so no time goes to evaluation now.
                    self.save(None)
                    return self._report(preempted=True)
                self._end_epoch(partial=outcome == "max_steps", seconds=time.perf_counter() - tick)
                if cfg.max_steps and self.step >= cfg.max_steps:
                    break
            return self._report(preempted=False)
        finally:
            if self.log:
                self.log.close()

    def _train_epoch(self) -> str | None:
        """The rest of the current epoch: None when it finished, else "preempted" or "max_steps"."""
        sampler = self.train_loader.sampler
        accum = self.config.accum_steps
        sampler.set_epoch(self.epoch, skip=self.skip * self.config.batch_size)
        for batch_index, (images, targets) in enumerate(self.train_loader, start=self.skip):
            if batch_index == self.batches_per_epoch:
                break
            self._train_step(images, targets, last=(batch_index + 1) % accum == 0)
            self.skip = batch_index + 1
            if self.skip % accum:  # stops and checkpoints fall between optimizer steps only
                continue
            if any_rank_stopping(self.stop, self.device):
                return "preempted"
            if self.config.max_steps and self.step >= self.config.max_steps:
                return "max_steps" if self.skip < self.batches_per_epoch else None
        self.skip = self.batches_per_epoch
        return None

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor, last: bool) -> None:
        """One batch's gradient, 1/accum of the step's; ``last``: the step's final batch, which
        applies the update (DDP all-reduces only then)."""
        cfg = self.config
        images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        sync = contextlib.nullcontext() if last or not self.info.enabled else self.net.no_sync()
        with sync:
            with self.autocast():
                loss = self.criterion(self.net(images), targets)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FinetuneError(f"loss is {value} at step {self.step}; the last good checkpoint is "
                                    f"{self.out / 'last.pt'}; lower --blr")
            (loss / cfg.accum_steps).backward()
        self.losses.append(value)
        if not last:
            return
        lr = lr_at(self.step, *self.schedule, self.base_lr, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        value, self.losses = sum(self.losses) / len(self.losses), []
        if self.log and (self.step % cfg.log_every == 0 or self.step == 1):
            self.log.write(json.dumps({"step": self.step, "epoch": self.epoch, "loss": value, "lr": lr}) + "\n")

    def _end_epoch(self, partial: bool, seconds: float) -> None:
        """Evaluate, checkpoint (a part-done epoch is never "best") and log."""
        metrics = evaluate(self.model, self.val_loader, self.device, self.info, self.autocast)
        if partial:
            self.save(None)
        else:
            self.epoch, self.skip = self.epoch + 1, 0
            self.save(metrics)
        if self.info.is_main:
            epoch = self.epoch - (not partial)
            record = {"epoch": epoch, "step": self.step, **metrics, "best_top1": self.best,
                      "epoch_s": round(seconds, 2)}
            if partial:  # --max-steps ended the run inside this epoch: scored, not a finished epoch
                record["partial"] = True
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
            print(f"epoch {epoch} step {self.step}: top-1 {100 * metrics['top1']:.2f}% "
                  f"top-5 {100 * metrics['top5']:.2f}% (best {100 * self.best:.2f}%)", flush=True)

    def _report(self, preempted: bool) -> int:
        if self.info.is_main and preempted:
            print(f"lomar finetune: stopped by {self.stop.name} at step {self.step}; checkpoint "
                  f"{self.out / 'last.pt'}. Resume with the same command plus --resume auto", flush=True)
        elif self.info.is_main:
            best_path = self.out / "best.pt"
            print(f"lomar finetune: done at step {self.step}; " + (
                f"best top-1 {100 * self.best:.2f}%, {best_path}" if best_path.exists()
                else f"no full epoch evaluated yet, so no best.pt; checkpoint {self.out / 'last.pt'}"))
        return self.stop.exit_code if preempted else 0


def _prepare_folder(config: FinetuneConfig, run: FinetuneRun, resume: Path | None) -> None:
    """Main process, lock held: clean stale temporaries; a resume cuts the log back to its
    checkpoint, a new run clears what an overwritten run left."""
    out = Path(config.out)
    removed = remove_stale_temporaries(out)
    if removed:
        print(f"lomar finetune: removed {len(removed)} stale temporary file(s) in {out}, e.g. {removed[0].name}")
    if resume is not None:
        truncate_metrics(out / "metrics.jsonl", run.step)
        print(f"lomar finetune: resumed from {resume} at step {run.step} (epoch {run.epoch})", flush=True)
    else:
        refuse_held_run(out, config.resume, config.overwrite)  # another run may have got here since validation
        for stale in ("last.pt", "best.pt", "metrics.jsonl"):
            (out / stale).unlink(missing_ok=True)
    atomic_write_text(out / "config.yaml", dump_finetune_config(config))


def finetune(config: FinetuneConfig) -> int:
    """Run (or resume) a finetuning; returns the process exit code."""
    try:
        info, device = init_distributed(config.device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    out = Path(config.out)
    lock, run = RunLock(out), None
    try:
        if info.is_main:  # only the main process writes into the folder
            lock.acquire()
        resume = None
        if config.resume == "auto":
            resume, notes = find_resume_checkpoint(out)
            for note in notes if info.is_main else ():
                print(f"lomar finetune: {note}", flush=True)
        elif config.resume:
            resume = Path(config.resume)
        if resume is not None and info.is_main:
            check_no_rewind(resume, out, config.overwrite)
        run = FinetuneRun(config, info, device)
        if resume is not None:
            run.load(resume)
        if info.is_main:
            _prepare_folder(config, run, resume)
        return run.run()
    except FinetuneError as exc:
        print(f"lomar finetune: error: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        lock.release(remove_if_empty=True)
        raise
    finally:
        if run is not None:
            run.stop.restore()
            shut_down_workers(run.train_loader, run.val_loader)
        lock.release()
        cleanup_distributed()
