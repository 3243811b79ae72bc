"""A stop-gap runner for :class:`~lomar.train.segment.SegmentTask`, single process, until the shared
run lifecycle (``lomar.train.lifecycle``) drives every training task; it uses only the Task
interface, so the lifecycle replaces it without touching the task.

It does what a run needs and no more: the run folder (lock, ``config.yaml``, refusing a held
folder unless resuming), AdamW over the task's groups with the task's lr schedule, AMP autocast,
``metrics.jsonl`` (loss lines, evaluation lines), ``last.pt`` with model, optimizer, position and
RNG state (``--resume`` continues from it mid-epoch), ``best.pt`` on the task's best metric.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from lomar.checkpoints.io import atomic_write_text, safe_load
from lomar.errors import UsageError
from lomar.train.run_state import (
    RunLock,
    autocast_factory,
    find_resume_checkpoint,
    resolve_precision,
    rng_state,
    save_checkpoint,
    save_state,
    set_rng_state,
    truncate_metrics,
)
from lomar.train.runtime import default_threads, fast_adamw
from lomar.train.segment_config import SegmentConfig, dump_segment_config

__all__ = ["run_segment"]


def run_segment(config: SegmentConfig) -> int:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("lomar segment runs in one process for now (the shared lifecycle will bring torchrun); "
                         "run it without torchrun")
    from lomar.train.distributed import init_distributed

    _, device = init_distributed(config.device)
    torch.set_num_threads(config.threads or default_threads())
    torch.manual_seed(config.seed)
    from lomar.train.segment import SegmentTask

    try:  # the data are checked before the run folder is made
        task = SegmentTask(config, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        return _Run(config, task, device, out).run()


class _Run:
    def __init__(self, config: SegmentConfig, task, device: torch.device, out: Path):
        self.config, self.task, self.device, self.out = config, task, device, out
        self.optimizer = fast_adamw(task.param_groups(), betas=(0.9, 0.999))
        self.peak = [group["lr"] for group in self.optimizer.param_groups]
        self.per_epoch = len(task.train_loader)
        self.total = config.max_steps or config.epochs * self.per_epoch
        self.span = config.schedule_steps or config.epochs * self.per_epoch
        self.autocast = autocast_factory(resolve_precision(config.precision, device), device)
        self.step = self.epoch = self.batches_done = 0
        self.best = -math.inf
        resume = self._resume_path()
        if resume is not None:
            self._load(resume)
        truncate_metrics(out / "metrics.jsonl", self.step)
        atomic_write_text(out / "config.yaml", dump_segment_config(config))

    def _resume_path(self) -> Path | None:
        if not self.config.resume:
            return None
        if self.config.resume == "auto":
            return find_resume_checkpoint(self.out)[0]
        return Path(self.config.resume)

    def _load(self, path: Path) -> None:
        ckpt = safe_load(path)
        self.task.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.epoch, self.batches_done = ckpt["step"], ckpt["epoch"], ckpt["batches_done"]
        self.best = ckpt.get("best", -math.inf)
        self.task.load(ckpt.get("task_state", {}))
        set_rng_state(ckpt["rng"])
        print(f"lomar segment: resumed {path} at step {self.step}", file=sys.stderr)

    def _state(self) -> dict:
        return {"task": "segment", "model": self.task.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "epoch": self.epoch, "batches_done": self.batches_done, "best": self.best,
                "task_state": self.task.state(), "rng": rng_state(), "settings": self.config.to_dict()}

    def _write(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")

    def run(self) -> int:
        config, task = self.config, self.task
        print(f"lomar segment: {len(task.train_set)} training / {len(task.val_set)} validation images in "
              f"{config.data}, {config.num_classes} classes; {task.source}; {self.total} steps of batch "
              f"{config.batch_size} at {config.img_size} px on {self.device}; writing {self.out}", file=sys.stderr)
        task.model.train()
        evaluated_at = None
        while self.step < self.total:
            task.sampler.set_epoch(self.epoch, skip=self.batches_done * config.batch_size)
            for batch in task.train_loader:
                self._train_step(batch)
                if config.eval_every and self.step % config.eval_every == 0 and self.step < self.total:
                    self._evaluate()
                    evaluated_at = self.step
                if self.step >= self.total:
                    break
            else:
                self.epoch, self.batches_done = self.epoch + 1, 0
                if self.step < self.total and evaluated_at != self.step and not config.eval_every:
                    self._evaluate()
                    evaluated_at = self.step
        metrics = self._evaluate() if evaluated_at != self.step else self.last_metrics
        task.finish(self.out)
        print(f"lomar segment: done, {self.step} steps; mIoU {metrics['mIoU']:.2f}, mAcc {metrics['mAcc']:.2f}, "
              f"aAcc {metrics['aAcc']:.2f} (percent); predictions in {self.out / 'predictions'}")
        return 0

    def _train_step(self, batch) -> None:
        factor = self.task.schedule(self.step, self.span)
        for group, peak in zip(self.optimizer.param_groups, self.peak):
            group["lr"] = peak * factor
        with self.autocast():
            loss = self.task.loss(batch)
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss is {loss.item()} at step {self.step + 1}; lower --lr (last.pt holds the "
                               f"last good state)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.batches_done += 1
        if self.step % self.config.log_every == 0 or self.step == self.total:
            self._write({"step": self.step, "epoch": self.epoch, "loss": float(loss.detach()),
                         "lr": self.config.lr * factor})
            print(f"step {self.step}/{self.total} epoch {self.epoch} loss {float(loss.detach()):.4f} "
                  f"lr {self.config.lr * factor:.2e}", file=sys.stderr, flush=True)

    def _evaluate(self) -> dict:
        started = time.perf_counter()
        metrics = self.task.evaluate()
        self.last_metrics = metrics
        self._write({"step": self.step, "epoch": self.epoch, **metrics,
                     "eval_seconds": round(time.perf_counter() - started, 2)})
        print(f"step {self.step}: mIoU {metrics['mIoU']:.2f} mAcc {metrics['mAcc']:.2f} aAcc {metrics['aAcc']:.2f}",
              file=sys.stderr)
        value = metrics.get(self.task.best_metric, -math.inf)
        improved = value > self.best
        self.best = max(self.best, value) if improved else self.best
        state = self._state()
        save_checkpoint(state, self.out)
        if improved:
            save_state(state, self.out / "best.pt")
        return metrics
