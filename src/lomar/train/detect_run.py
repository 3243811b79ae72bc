"""A single-process runner for :class:`lomar.train.detect.DetectTask`, standing in for the shared
run lifecycle (``lomar.train.lifecycle``) until that lands; it uses the Task interface only.

It owns the folder (run lock, ``--resume``, ``config.yaml``, metrics truncation), the optimizer
(AdamW over the task's groups, ``lr_scale`` applied), the task's lr schedule, gradient
accumulation, autocast, the stop signals, ``last.pt`` / ``best.pt`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from lomar.checkpoints.io import atomic_write_text, safe_load
from lomar.errors import UsageError
from lomar.train.detect import DetectTask, stderr_log
from lomar.train.detect_config import DetectConfig, dump_detect_config
from lomar.train.preemption import StopFlag
from lomar.train.run_state import (
    RunLock,
    autocast_factory,
    check_no_rewind,
    find_resume_checkpoint,
    remove_stale_temporaries,
    resolve_precision,
    rng_state,
    save_checkpoint,
    save_state,
    set_rng_state,
    truncate_metrics,
)
from lomar.train.runtime import default_threads, fast_adamw

__all__ = ["run_detect"]


def _write(log, record: dict) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()


def _evaluate_only(task: DetectTask, out: Path) -> int:
    metrics = task.evaluate()
    with open(out / "metrics.jsonl", "a") as log:
        _write(log, {"eval_only": True, "pretrained": task.config.pretrained, **metrics})
    task.finish(out)
    stderr_log(f"lomar detect: box AP {_pct(metrics['box_AP'])}, mask AP {_pct(metrics.get('mask_AP'))}; "
               f"{out / 'predictions.json'}")
    return 0


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def run_detect(config: DetectConfig, device: str) -> int:
    """Train (or resume, or only evaluate) a detector; the process exit code."""
    torch.set_num_threads(config.threads or default_threads())
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    out, dev = Path(config.out), torch.device(device)
    with RunLock(out):
        resume = None
        if config.resume == "auto":
            resume, notes = find_resume_checkpoint(out)
            for note in notes:
                stderr_log(f"lomar detect: {note}")
        elif config.resume:
            resume = Path(config.resume)
        if resume is not None:
            check_no_rewind(resume, out, config.overwrite)
        task = DetectTask(config, dev, log=stderr_log)
        if config.eval_only:
            return _evaluate_only(task, out)
        return _Runner(task, config, out, dev).run(resume)


class _Runner:
    def __init__(self, task: DetectTask, config: DetectConfig, out: Path, device: torch.device):
        self.task, self.config, self.out, self.device = task, config, out, device
        self.base_lr = config.blr * config.batch_size * config.accum_steps / 256
        self.optimizer = fast_adamw(task.param_groups(), lr=self.base_lr)
        self.steps_per_epoch = len(task.train_loader) // config.accum_steps
        full = config.epochs * self.steps_per_epoch
        self.total = min(full, config.max_steps) if config.max_steps else full
        self.autocast = autocast_factory(resolve_precision(config.precision, device), device)
        self.epoch, self.skip, self.step, self.best = 0, 0, 0, -math.inf
        self.stop = StopFlag()

    def _state(self) -> dict:
        return {"model": self.task.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "batches_done": self.skip, "step": self.step, "best": self.best, "settings": self.config.to_dict(),
                "rng": rng_state(), **self.task.state()}

    def _save(self, metrics: dict | None) -> None:
        state = self._state()
        value = (metrics or {}).get(self.task.best_metric)
        if value is not None and value >= self.best:
            self.best = state["best"] = value
            save_state({k: v for k, v in state.items() if k not in ("optimizer", "rng")} | {"metrics": metrics},
                       self.out / "best.pt", previous=self.out / "last.pt")
        save_checkpoint(state, self.out)

    def _load(self, path: Path) -> None:
        try:
            ckpt = safe_load(path, map_location=self.device)
            self.task.load(ckpt)
            self.task.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"--resume {path} does not fit this run: {first}") from None
        self.epoch, self.skip, self.step, self.best = ckpt["epoch"], ckpt["batches_done"], ckpt["step"], ckpt["best"]
        set_rng_state(ckpt["rng"])

    def run(self, resume: Path | None) -> int:
        removed = remove_stale_temporaries(self.out)
        if removed:
            stderr_log(f"lomar detect: removed {len(removed)} stale temporary file(s) in {self.out}")
        if resume is not None:
            self._load(resume)
            truncate_metrics(self.out / "metrics.jsonl", self.step)
            stderr_log(f"lomar detect: resumed from {resume} at step {self.step} (epoch {self.epoch})")
        else:
            for stale in ("last.pt", "best.pt", "metrics.jsonl", "predictions.json"):
                (self.out / stale).unlink(missing_ok=True)
        atomic_write_text(self.out / "config.yaml", dump_detect_config(self.config))
        stderr_log(f"lomar detect: {self.total} steps of {self.config.batch_size} x {self.config.accum_steps} images "
                   f"at {self.config.img_size} px on {self.device}, into {self.out}")
        self.task.model.train()
        self.stop.install()
        try:
            with open(self.out / "metrics.jsonl", "a") as log:
                return self._loop(log)
        finally:
            self.stop.restore()

    def _loop(self, log) -> int:
        cfg, metrics = self.config, None
        while self.step < self.total:
            tick = time.perf_counter()
            stopped = self._epoch(log)
            if stopped:
                self._save(None)
                stderr_log(f"lomar detect: stopped by {self.stop.name} at step {self.step}; checkpoint "
                           f"{self.out / 'last.pt'}. Resume with the same command plus --resume auto")
                return self.stop.exit_code
            finished = self.skip >= self.steps_per_epoch * cfg.accum_steps
            if finished:
                self.epoch, self.skip = self.epoch + 1, 0
            last = self.step >= self.total
            if last or (finished and cfg.eval_every and self.epoch % cfg.eval_every == 0):
                metrics = self.task.evaluate()
                _write(log, {"epoch": self.epoch, "step": self.step, **metrics,
                             "epoch_s": round(time.perf_counter() - tick, 2)})
                stderr_log(f"epoch {self.epoch} step {self.step}: box AP {_pct(metrics['box_AP'])}, "
                           f"mask AP {_pct(metrics.get('mask_AP'))}")
            self._save(metrics if finished or last else None)
        self.task.finish(self.out)
        stderr_log(f"lomar detect: done at step {self.step}; metrics in {self.out / 'metrics.jsonl'}, "
                   f"predictions in {self.out / 'predictions.json'}")
        return 0

    def _epoch(self, log) -> bool:
        """The rest of the current epoch, up to the run's last step; True when a stop signal came."""
        cfg, loader = self.config, self.task.train_loader
        loader.sampler.set_epoch(self.epoch, skip=self.skip * cfg.batch_size)
        losses = []
        for index, batch in enumerate(loader, start=self.skip):
            if index >= self.steps_per_epoch * cfg.accum_steps or self.step >= self.total:
                break
            with self.autocast():
                loss = self.task.loss(batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise UsageError(f"loss is {value} at step {self.step}; the last good checkpoint is "
                                 f"{self.out / 'last.pt'}; lower --blr")
            (loss / cfg.accum_steps).backward()
            losses.append(value)
            self.skip = index + 1
            if self.skip % cfg.accum_steps:
                continue
            lr = self.base_lr * self.task.lr_factor(self.step, self.total)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.step % cfg.log_every == 0 or self.step == 1:
                parts = {k: round(float(v.detach()), 5) for k, v in self.task.last_losses.items()}
                _write(log, {"step": self.step, "epoch": self.epoch, "loss": sum(losses) / len(losses), "lr": lr,
                             **parts})
            losses = []
            if self.stop.signal is not None:
                return True
        return False
