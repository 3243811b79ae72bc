"""The pretraining loop: schedule, AMP, accumulation, logging, checkpoints, resume, DDP.

A run is fully described by its config; the data order is a permutation seeded by
(seed, epoch) and every sample's crop and masking by (seed, epoch, index), so a run
resumed from a checkpoint (model, optimizer, scaler, step, epoch, batches consumed)
continues exactly as if it had never stopped, whatever the number of workers.
With ``--fsdp`` the model is sharded (``lomar.train.fsdp``) instead of wrapped in DDP, and
checkpoints are sharded folders; rank 0 consolidates the last one to ``last.pt`` at the end.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset

from lomar.checkpoints.export import export_encoder
from lomar.checkpoints.formats import PRETRAIN_FORMAT
from lomar.checkpoints.io import safe_load
from lomar.data.collate import BadDataTracker
from lomar.data.device_decode import decode_dataset
from lomar.data.folder import build_pretrain_dataset
from lomar.data.samplers import EpochSampler
from lomar.errors import UsageError
from lomar.methods.base import method_runtime
from lomar.models.spec import model_spec
from lomar.train.config import PretrainConfig, build_model, prepare_method
from lomar.train.distributed import DistInfo, cleanup_distributed, init_distributed
from lomar.train.fsdp import consolidate_into, load_sharded, save_run_checkpoint, shard_model
from lomar.train.monitor import Monitor
from lomar.train.preemption import StopFlag, any_rank_stopping, ignore_stop_signals, shut_down_workers
from lomar.train.pretrain_folder import prepare_folder, resume_path
from lomar.train.run_state import (
    RunLock,
    autocast_factory,
    check_no_rewind,
    checkpoints_to_prune,
    resolve_precision,
    rng_state,
    save_checkpoint,
    save_on_main_rank,
    set_rng_state,
)
from lomar.train.runtime import default_threads, fast_adamw
from lomar.train.schedule import lr_at, param_groups, schedule_span, warmup_warning

__all__ = ["Trainer", "TrainingError", "make_masker", "train", "checkpoints_to_prune"]


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, too many unreadable images)."""


def make_masker(config: PretrainConfig, patch_size: int):
    """Per-sample masking drawn in the data workers, seeded with the sample's augmentation."""
    return method_runtime(config, patch_size).masker


class Trainer:
    def __init__(self, config: PretrainConfig, info: DistInfo, device: torch.device):
        self.config, self.info, self.device = config, info, device
        self.out = Path(config.out)
        torch.set_num_threads(config.threads or default_threads())
        torch.manual_seed(config.seed)
        self.model = build_model(config, prepare_method(config)).to(device)
        self.patch = self.model.config.patch_size
        self.runtime = method_runtime(config, self.patch)
        self.precision = resolve_precision(config.precision, device)
        self.autocast = autocast_factory(self.precision, device)
        if config.fsdp:  # before the optimizer: it must hold the sharded parameters
            shard_model(self.model, "bf16" if self.precision == "bf16" else "fp32")
        # The reference dataset draws the figures; the one the loader reads follows --decode.
        self.base_dataset = build_pretrain_dataset(config.data, config.img_size, config.seed, config.crop_scale,
                                                   masker=self.runtime.masker, color_jitter=config.color_jitter,
                                                   rank=info.rank, world_size=info.world_size)
        self.decoding = decode_dataset(self.base_dataset, config.decode, self.patch, config.window_size,
                                       config.windows, device)
        self.dataset = self.decoding.dataset
        self.iterable = isinstance(self.dataset, IterableDataset)
        size = self._dataset_size()
        per_rank = size // info.world_size
        self.steps_per_epoch = per_rank // config.batch_size // config.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"{size} images cannot fill one step of batch {config.batch_size} x accum "
                                f"{config.accum_steps} x {info.world_size} process(es); lower --batch-size")
        self.sampler = None if self.iterable else EpochSampler(size, config.seed, info.rank, info.world_size)
        self.loader = DataLoader(self.dataset, batch_size=config.batch_size, sampler=self.sampler,
                                 num_workers=config.workers, collate_fn=self.decoding.collate, drop_last=True,
                                 pin_memory=device.type == "cuda", persistent_workers=config.workers > 0,
                                 worker_init_fn=ignore_stop_signals if config.workers > 0 else None,
                                 # Its own generator: each new iterator (one more after a resume) then
                                 # leaves the global RNG, which drop path draws from, untouched.
                                 generator=torch.Generator().manual_seed(config.seed))
        self.schedule = schedule_span(self.steps_per_epoch, config.epochs, config.warmup_epochs, config.schedule_steps)
        effective = config.batch_size * config.accum_steps * info.world_size
        self.base_lr = config.lr if config.lr is not None else config.blr * effective / 256
        self.optimizer = fast_adamw(param_groups(self.model, config.weight_decay), lr=self.base_lr,
                                    betas=config.betas)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.net = self.model
        if config.compile:
            self.net = torch.compile(self.net)
        if info.enabled and not config.fsdp:
            self.net = DistributedDataParallel(self.net, device_ids=[device.index] if device.type == "cuda" else None)
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.tracker = BadDataTracker(total=per_rank)
        self.stop = StopFlag()
        self.spare: dict | None = None  # the last batch with readable images (see run)
        self.knn, self.knn_step = None, -1
        if config.knn_every and info.is_main:
            from lomar.eval.knn import KnnMonitor

            self.knn = KnnMonitor(config.knn_data, img_size=config.img_size, workers=min(config.workers, 4))

    def _dataset_size(self) -> int:
        return self.dataset.count_samples() if self.iterable else len(self.dataset)

    # ---- checkpoints -------------------------------------------------------------
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **self.meta()}

    def meta(self) -> dict:
        """Everything of the state but model and optimizer (a sharded checkpoint's meta.pt)."""
        return {"scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                "batches_done": self.batches_done, "config": self.config.to_dict(),
                "model_spec": model_spec(self.model), "rng": rng_state(), "format": PRETRAIN_FORMAT}

    def load(self, path: Path) -> None:
        if path.is_dir():  # a sharded checkpoint: every rank loads its shards
            ckpt = load_sharded(self.model, self.optimizer, path)
        else:
            ckpt = safe_load(path, map_location=self.device)
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.batches_done = ckpt["step"], ckpt["epoch"], ckpt["batches_done"]
        set_rng_state(ckpt["rng"])
        if self.batches_done >= self.steps_per_epoch * self.config.accum_steps:
            self.epoch, self.batches_done = self.epoch + 1, 0

    def save(self, figure: bool = True) -> Path | None:
        if self.config.fsdp:  # collective; the figure needs the whole model: drawn at the end only
            path = save_run_checkpoint(self.model, self.optimizer, self.meta(), self.out, self.step,
                                       self.config.keep_last)
            return path if self.info.is_main else None
        return save_on_main_rank(lambda: self._save_file(figure), self.info.is_main, self.device)

    def _save_file(self, figure: bool) -> Path:
        path = save_checkpoint(self.state(), self.out, self.step, self.config.keep_last)
        if figure:
            self.figure()
        return path

    def figure(self, model=None) -> None:
        """reconstruction-STEP.png (+ reconstruction.png, the latest) and loss.png; ``model``: an
        unsharded copy when the run is sharded (FSDP)."""
        from lomar.viz.curves import loss_curve
        from lomar.viz.reconstruction import reconstruction_snapshot

        try:
            reconstruction_snapshot(model or self.model, self.fixed_images(), self.out, self.step,
                                    seed=self.config.seed, title=f"{self.config.method} step {self.step}",
                                    draw=self.runtime.method.figure)
            loss_curve(self.out / "metrics.jsonl", self.out / "loss.png", f"{self.config.method} training loss")
        except Exception as exc:  # a figure must never kill a run
            print(f"lomar: could not draw the reconstruction figure: {exc}", file=sys.stderr)

    def fixed_images(self) -> torch.Tensor:
        items = []
        data = self.base_dataset
        source = iter(data) if self.iterable else (data[(i, 0)] for i in range(len(data)))
        for item in source:
            if item["image"] is not None:
                items.append(item["image"])
            if len(items) == self.config.figure_images:
                break
        return torch.stack(items).to(self.device)

    # ---- training ---------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        images = batch["images"].to(self.device, non_blocking=True)
        with self.autocast():
            return self.net(images, **self.runtime.forward_kwargs(batch, self.device)).loss

    def run(self) -> int:
        """Train to ``--max-steps`` / ``--epochs`` or until a stop signal; the exit code."""
        cfg = self.config
        total = cfg.epochs * self.steps_per_epoch
        last_step = min(total, cfg.max_steps) if cfg.max_steps else total
        log = Monitor(self.out, self.info.is_main, last_step, cfg.log_every)
        if self.step >= last_step:
            log.close()
            print(f"lomar: nothing to do, the run is at step {self.step} of {last_step}")
            return 0
        warning = warmup_warning(last_step, self.schedule[1], self.base_lr)
        if warning and self.info.is_main:
            print(f"lomar pretrain: warning: {warning}", flush=True)
        self.stop.install()
        if self.step == 0 and self.info.is_main and not cfg.fsdp:  # sharded: the figure is drawn at the end
            self.figure()  # the untrained model: what the last figure is compared with
        while self.epoch < cfg.epochs:
            if self._train_epoch(log, last_step):
                return self._finish(log, preempted=self.step < last_step)
            self._end_epoch(log)
        return self._finish(log, preempted=False)

    def _position_data(self) -> None:
        """Point the data order at this epoch, past the batches a resumed run already consumed."""
        skip, bs = self.batches_done * self.config.batch_size, self.config.batch_size
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch, skip=skip)
        else:
            self.dataset.set_epoch(self.epoch, skip=skip, batch_size=bs)

    def _train_epoch(self, log: Monitor, last_step: int) -> bool:
        """The rest of the current epoch; True when the run must stop now."""
        accum = self.config.accum_steps
        self._position_data()
        self.losses, self.seen, self.tick, micro = [], 0, time.perf_counter(), 0
        # Stop at whole optimizer steps: a tail that cannot fill `accum` batches is left out.
        limit = self.steps_per_epoch * accum - self.batches_done
        for batch in self.loader:
            if micro == limit:
                break
            micro += 1
            batch = self.decoding.on_device(batch)
            batch, n = self._readable(batch)
            if batch is not None:
                self._backward(batch, n, sync=micro % accum == 0 or not self.info.enabled)
            if micro % accum:
                continue
            self.batches_done += accum
            if self._optimizer_step(log) and self._should_stop(last_step):
                return True
        return False

    def _readable(self, batch: dict) -> tuple[dict | None, int]:
        """(the batch to run, its readable image count) after counting the unreadable ones."""
        n = batch["images"].shape[0] if batch["images"].numel() else 0
        self.tracker.update(batch["bad"], n + len(batch["bad"]))
        try:
            self.tracker.check()
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        if n:
            self.spare = batch
            return batch, n
        if self.info.enabled and self.spare is not None:
            # Every image of this batch was unreadable, but DDP needs every rank in each
            # backward: run a readable batch with zero weight.
            return dict(self.spare, zero_weight=True), 0
        return None, 0

    def _backward(self, batch: dict, n: int, sync: bool) -> None:
        """Accumulate the gradient of one micro-batch (all-reduced under DDP only when ``sync``)."""
        if self.config.fsdp:
            self.model.set_requires_gradient_sync(sync)
        with contextlib.nullcontext() if sync or self.config.fsdp else self.net.no_sync():
            loss = self.forward(batch)
            weight = 0.0 if "zero_weight" in batch else 1.0 / self.config.accum_steps
            self.scaler.scale(loss * weight).backward()
        if n:
            self.losses.append(loss.detach())
        self.seen += n

    def _optimizer_step(self, log: Monitor) -> bool:
        """Apply the accumulated gradient and log; False when no rank had a readable image."""
        cfg = self.config
        # Mean loss over every rank's batches; no batch with a readable image -> no update.
        losses = self.losses
        loss_sum = torch.stack(losses).float().sum() if losses else torch.zeros((), device=self.device)
        totals = torch.stack([loss_sum, torch.tensor(float(len(losses)), device=self.device)])
        if self.info.enabled:
            dist.all_reduce(totals)
        if totals[1] == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.losses = []
            return False
        lr = lr_at(self.step, *self.schedule, self.base_lr, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        value = float(totals[0] / totals[1])
        if not math.isfinite(value):
            last = self.out / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise TrainingError(
                f"loss is {value} at step {self.step} (epoch {self.epoch}); {kept}; lower --blr/--lr, "
                f"set --clip-grad or use --precision fp32")
        elapsed = time.perf_counter() - self.tick
        log.step(self.step, self.epoch, value, lr, self.seen * self.info.world_size / max(elapsed, 1e-9))
        self.tick, self.seen, self.losses = time.perf_counter(), 0, []
        return True

    def _end_epoch(self, log: Monitor) -> None:
        self.epoch, self.batches_done = self.epoch + 1, 0
        if self.config.knn_every and self.epoch % self.config.knn_every == 0:
            self._knn(log)
        if self.epoch % self.config.save_every == 0 and self.epoch < self.config.epochs:
            self.save()

    def _knn(self, log: Monitor) -> None:
        """k-NN top-1 on --knn-data (main process; the others wait at their next collective)."""
        if self.knn is not None and self.step != self.knn_step:
            finished = self.epoch + int(self.batches_done >= self.steps_per_epoch * self.config.accum_steps)
            log.knn(self.step, finished, self.knn(self.model.encoder, self.device))
            self.knn_step = self.step

    def _should_stop(self, last_step: int) -> bool:
        return any_rank_stopping(self.stop, self.device) or self.step >= last_step

    def _finish(self, log: Monitor, preempted: bool) -> int:
        path = self.save()
        if not preempted:
            self._knn(log)  # the final score, whatever --knn-every
        log.close()
        # Collective: the other ranks wait for the main one's files, and stop with it if it fails.
        save_on_main_rank(lambda: self._write_outputs(path, preempted), self.info.is_main, self.device)
        return self.stop.exit_code if preempted else 0

    def _write_outputs(self, path: Path, preempted: bool) -> None:
        """Main process: last.pt, the figure and the encoder (from the whole model if sharded)."""
        model = self.model
        if self.config.fsdp:
            model = consolidate_into(path, self.out / "last.pt", build_model(self.config)).to(self.device)
            self.figure(model)
        if preempted:
            print(f"lomar: stopped by {self.stop.name} at step {self.step}; checkpoint {path}. Resume with: "
                  f"lomar pretrain --out {self.out} --resume auto", flush=True)
        else:
            meta = {"method": self.config.method, "step": self.step}
            if self.runtime.method.export is not None:
                self.runtime.method.export(model, self.out, meta)
            else:
                export_encoder(model.encoder, self.out, weights_name="encoder.safetensors", metadata=meta)
            from lomar.viz.curves import loss_summary
            losses, last = loss_summary(self.out / "metrics.jsonl"), self.out / "last.pt"
            print(f"lomar: done at step {self.step}{f' ({losses})' if losses else ''}; checkpoint {path}, "
                  f"encoder {self.out / 'encoder.safetensors'}, figures {self.out}/reconstruction-*.png and "
                  f"loss.png. Next: lomar visualize {last} --attention; lomar export {last} --to DIR")
        print(f"lomar: {self.tracker.count} unreadable image(s) skipped"
              + (f", e.g. {next(iter(self.tracker.bad))}" if self.tracker.count else ""))


def train(config: PretrainConfig) -> int:
    """Run (or resume) a pretraining; returns the process exit code."""
    try:  # what fails before the first step is the set-up's fault: a one-line error, exit 2
        info, device = init_distributed(config.device)
    except (ValueError, RuntimeError) as exc:
        message = str(exc).splitlines()[0]
        raise UsageError(message if "--device" in message else f"--device {config.device}: {message}") from None
    out = Path(config.out)
    lock = RunLock(out)
    try:
        if info.is_main:  # only the main process writes into the folder
            lock.acquire()
        resume = resume_path(config, out, info.is_main)
        try:
            if resume is not None and info.is_main:
                check_no_rewind(resume, out, config.overwrite)
            trainer = Trainer(config, info, device)
            if resume is not None:
                trainer.load(resume)
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(str(exc)) from None
        if info.is_main:
            prepare_folder(config, out, resume, trainer.step)
        try:
            code = trainer.run()
        finally:
            trainer.stop.restore()
            shut_down_workers(trainer.loader)
        if info.enabled:  # leave together: a rank that tears gloo down while rank 0 still exports can abort
            dist.barrier()
        return code
    except BaseException:
        lock.release(remove_if_empty=True)
        raise
    finally:
        lock.release()
        cleanup_distributed()
