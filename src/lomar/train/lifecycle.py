"""The one run lifecycle of every training command: a command provides a :class:`~lomar.train.task.Task`,
:func:`run` does the rest.

``run(config, make_task)``, ``make_task(config, info, device) -> Task``, owns the process group and DDP, the run folder
(lock, ``--resume PATH|auto``, ``config.yaml``, metrics cut back on resume), the RNG state in checkpoints, stop signals
(SIGTERM/SIGUSR1: checkpoint, exit 0; Ctrl-C: 130), the position (epoch, ``batches_done``, step), AdamW over
``task.param_groups()`` (a group's ``lr_scale`` scales its lr), warm-up + cosine, ``accum_steps`` (DDP ``no_sync``
between), autocast + GradScaler, ``clip_grad``, the non-finite loss stop (before the update; non-finite weights are
never saved), the start-up line, ``Monitor`` (metrics.jsonl, TensorBoard, progress), ``last.pt`` / ``checkpoint-N.pt``
(with ``config.keep_last``) / ``best.pt`` (on ``task.best_metric``) and the final line. A resumed run skips the batches
its checkpoint consumed of the (seed, epoch) data order: it continues exactly. Optional config fields: ``lr``,
``clip_grad``, ``compile``, ``compile_mode``, ``save_every`` (default 1), ``keep_last``, ``time_limit`` (preemption).
The Task interface, its required and optional hooks: :mod:`lomar.train.task`.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lomar.checkpoints.file_names import BEST, LAST
from lomar.errors import LomarError, UsageError, in_flags
from lomar.lr_schedule import lr_at, peak_lr
from lomar.train.distributed import DistInfo, any_rank, cleanup_distributed, join_group, main_rank_out, sync_stats
from lomar.train.divergence import check_weights, diverged, preload
from lomar.train.epoch_stream import EpochStream
from lomar.train.fsdp import save_run_checkpoint
from lomar.train.monitor import Monitor
from lomar.train.precision import WatchedScaler, autocast_factory, run_precision
from lomar.train.preemption import StopFlag, any_rank_stopping, shut_down_workers
from lomar.train.rewound_best import best_state
from lomar.train.rng import gather_rng_states, seed_everything
from lomar.train.run_end import answer_at_end, config_overrun, evaluate_end, last_step, run_end
from lomar.train.run_lines import announce, record_evaluation, report_end, say_notes
from lomar.train.run_lock import RunLock
from lomar.train.run_restore import restore
from lomar.train.run_resume import check_no_rewind, resume_point
from lomar.train.run_state import prepare_run_folder, save_checkpoint, save_on_main_rank, save_state
from lomar.train.runtime import compile_model, fast_adamw, keep_grads_allocated, use_threads
from lomar.train.schedule import run_span
from lomar.train.setting_flags import flags_by_setting
from lomar.train.setting_names import source_of
from lomar.train.skipped_files import SkippedFiles
from lomar.train.task import Progress, Task, TrainingError
from lomar.train.task_resume import building
from lomar.train.upscaled_files import UpscaledFiles

__all__ = ["run"]

class _Run:
    """One run of a Task: optimizer, scaler, position, checkpoints and the loop."""

    def __init__(self, config, task: Task, info: DistInfo, device: torch.device, stop: StopFlag):
        self.cfg, self.task, self.info, self.device, self.out = config, task, info, device, Path(config.out)
        self.accum = config.accum_steps
        self.precision = run_precision(config, device)  # a resumed run's 'auto': the one it trained in
        self.autocast = task.autocast = autocast_factory(self.precision, device)
        self.steps_per_epoch = task.batches_per_epoch() // self.accum  # a tail short of a whole step is left out
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training data ({len(task.train_loader.dataset)} images over {info.world_size} "
                             f"process(es)) cannot fill one step of {self.accum} batch(es) of {config.batch_size}; "
                             f"lower --batch-size or --accum-steps")
        self.schedule, self.min_lr = run_span(config, self.steps_per_epoch), getattr(config, "min_lr", 0.0)
        self.base_lr = peak_lr(config, info.world_size)
        self.optimizer = fast_adamw(task.param_groups(), lr=self.base_lr, betas=task.betas,
                                    weight_decay=config.weight_decay)
        self.scaler = WatchedScaler(device.type, self.precision, self.out, config)
        self.compiled = bool(getattr(config, "compile", False))
        mode = getattr(config, "compile_mode", "default")
        task.net = compile_model(task.model, mode) if self.compiled else task.model
        # the gradients stay allocated (zero_grad's set_to_none=False) where the compiled step's CUDA graphs need it
        self.keep_grads = self.compiled and not task.sharded and keep_grads_allocated(task.model, mode)
        if info.enabled and not task.sharded:
            task.net = DistributedDataParallel(task.net, device_ids=[device.index] if device.type == "cuda" else None)
        task.progress = self.p = Progress()
        self.best, self.evaluated_step, self.stop, self.notes = -math.inf, -1, stop, []
        self.saved: tuple = (None, None, None, None)  # the last checkpoint's step, epoch, batches_done and path
        self.spare = None  # under DDP, the last batch that gave a loss: an idle step's (task.idle_loss)
        self.skipped = SkippedFiles(self.steps_per_epoch * self.accum, config.batch_size, not task.skips_warned)
        self.upscaled = UpscaledFiles(task.crop_size, say=info.is_main) if task.crop_size else None
        self.upscales: dict | None = None  # every process's, as the last save gathered them
        self.last_step = last_step(config, self.steps_per_epoch)
        if overrun := config_overrun(config, self.steps_per_epoch, info.world_size, task.lr_schedule):
            raise ValueError(overrun)

    # ---- checkpoints -------------------------------------------------------------------
    def meta(self) -> dict:
        """Everything of a checkpoint but model and optimizer."""
        return {"scaler": self.scaler.state_dict(), "precision": self.precision, "step": self.p.step,
                "epoch": self.p.epoch, "batches_done": self.p.batches_done, "rng": self.rngs[0], "rng_ranks": self.rngs,
                "steps_per_epoch": self.steps_per_epoch,  # a resume at the run's end tells so unbuilt (run_end)
                "evaluated_step": self.evaluated_step, "skipped_ranks": self.skips,  # files skipped: a resume counts on
                "upscaled": self.upscales,  # and files upscaled
                **self.task.state(), **({f"best_{m}": self.best if self.best > -math.inf else None}  # None: unscored
                                        if (m := self.task.best_metric) else {})}

    def save(self, metrics: dict | None = None) -> Path | None:
        """``last.pt`` (+ ``checkpoint-N.pt`` with ``keep_last``; a sharded run: ``checkpoint-N.dcp``), and
        ``best.pt`` when ``metrics`` (a finished epoch's) hold the best ``best_metric`` so far. A collective."""
        with self.stop.saving():  # the time limit's margin keeps the last save's seconds for the final one
            check_weights(self.task.model, self.info.enabled, self.p.step, self.out, self.cfg, self.precision)
            self.rngs, self.skips = gather_rng_states(self.info, self.device), self.skipped.gathered(self.info)
            self.upscales = self.upscaled.gathered(self.info) if self.upscaled else None
            keep = getattr(self.cfg, "keep_last", None)
            if self.task.sharded:  # collective
                path = save_run_checkpoint(self.task.model, self.optimizer, self.meta(), self.out, self.p.step, keep)
                path = path if self.info.is_main else None
            else:
                path = save_on_main_rank(lambda: self._save_files(metrics, keep), self.info.is_main, self.device)
        self.saved = (self.p.step, self.p.epoch, self.p.batches_done, path)
        return path

    def _save_files(self, metrics: dict | None, keep: int | None) -> Path:
        metric = self.task.best_metric
        if best := bool(metric) and (metrics or {}).get(metric) is not None and metrics[metric] >= self.best:
            self.best = metrics[metric]
        state = {"model": self.task.model.state_dict(), "optimizer": self.optimizer.state_dict(), **self.meta()}
        if best:  # holds the precision it ran in, as last.pt: --eval-only scores a run under 'auto' as it trained
            save_state(best_state(state, metrics), self.out / BEST, previous=self.out / LAST)
        path = save_checkpoint(state, self.out, self.p.step if keep else None, keep or 0)
        self.task.saved(path)
        return path

    # ---- training ----------------------------------------------------------------------
    def train(self) -> int:
        """Train to ``--max-steps`` / ``--epochs`` or until a stop signal; the exit code."""
        cfg, p, task = self.cfg, self.p, self.task
        if p.step >= self.last_step:
            return answer_at_end(task, self.out, p.step, self.last_step, self.steps_per_epoch, cfg, self.info.is_main,
                                 self.device, trainer=self)
        self.monitor = Monitor(self.out, self.info.is_main, self.last_step, cfg.log_every, task.name, p.step)
        if self.info.is_main:
            announce(self)
        self.stop.install(task.model)  # its size estimates the first save's time, for the time limit's margin
        # the main process's, stopping the others with it as a failed save does (a full disk); a resume's too: a kill
        # between a checkpoint and what saved(path) writes after it leaves that to write again
        save_on_main_rank(task.begin, self.info.is_main, self.device)
        # a signal during begin (pretrain's first reconstruction figure: minutes at 2048 px on a CPU) stops the run
        # there, as one during an evaluation does, not after a first step that may take as long again
        stopping, self.epoch_tick = self._stopped_in_work(), time.perf_counter()
        if not stopping and p.step and task.eval_steps and p.step % task.eval_steps == 0 \
                and self.evaluated_step not in (None, p.step):
            self.save(self._evaluate())  # a stop that checkpointed this step came before its evaluation
            stopping = self._stopped_in_work()
        stream = EpochStream(task)
        with contextlib.closing(stream):  # its readers stop when the loop ends, however it ends
            while p.epoch < cfg.epochs and not stopping:
                stopping, ended = self._train_epoch(stream), p.step >= self.last_step  # the step it reached
                # What the ranks agreed on, not this process's flag: a signal that came after the last agreement is
                # heeded at the next step (else the epoch neither ends nor goes on); in the last step it stops nothing.
                if p.batches_done >= self.steps_per_epoch * self.accum and (ended or not self.signalled):
                    self._end_epoch()
                    stopping = stopping or ended or self._stopped_in_work()
                stopping = stopping or ended
        return self._finish(preempted=stopping and p.step < self.last_step)

    def _train_epoch(self, stream: EpochStream) -> bool:
        """The rest of the current epoch; True when a stop signal or the last step ends the run now."""
        p, accum, per_epoch = self.p, self.accum, self.steps_per_epoch * self.accum
        if per_epoch - p.batches_done <= 0:
            return False
        self.loss_sum, self.learned, self.tick, self.waited, micro = None, 0, time.perf_counter(), 0.0, 0
        for batch in self._timed(stream.epoch(p.epoch, p.batches_done, self.cfg.epochs - p.epoch, per_epoch)):
            micro += 1
            self._backward(batch, sync=micro % accum == 0 or not self.info.enabled)
            if micro % accum:
                continue
            p.batches_done += accum
            if self._optimizer_step():  # the time limit's margin counts an evaluation or epoch's end before the next
                scoring = self.task.eval_steps and p.step % self.task.eval_steps == 0
                self.signalled = any_rank_stopping(self.stop, self.device, scoring or p.batches_done >= per_epoch)
                if self.signalled or p.step >= self.last_step:
                    self.stop.ending = p.step >= self.last_step  # a Ctrl-C in the last epoch's end stops nothing
                    return True
                if scoring:
                    self.save(self._evaluate())
                    if self._stopped_in_work():
                        return True
        if p.batches_done < per_epoch:  # going on would ask the same loader for the same batches forever
            raise UsageError(f"the training data gave {p.batches_done} of the {per_epoch} batches of epoch {p.epoch} "
                             f"on this process: a loader worker found no readable image for its share (damaged tar "
                             f"shards, or fewer images than processes x --workers); lower --workers or fix the data")
        return False

    def _timed(self, batches):
        """``batches``, adding the seconds the loop waits for each to ``self.waited``: time the device waits for
        input, all but the optimizer update that the step's one host sync leaves it to run meanwhile."""
        start = time.perf_counter()
        for batch in batches:
            self.waited += time.perf_counter() - start
            yield batch
            start = time.perf_counter()

    def _backward(self, batch, sync: bool) -> None:
        """Accumulate one micro-batch's gradient (all-reduced under DDP only when ``sync``); its loss
        stays on the device until the optimizer step reads the window's mean."""
        task = self.task
        if task.sharded:
            task.model.set_requires_gradient_sync(sync)
        with contextlib.nullcontext() if sync or task.sharded or not self.info.enabled else task.net.no_sync():
            if self.compiled:  # CUDA graphs: this forward may overwrite the previous step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            self.skipped.count(task.skipped(batch))
            if self.upscaled:
                self.upscaled.count(task.sources(batch))
            with self.autocast():
                loss, weight = task.loss(batch), 1.0 / self.accum
                if loss is not None and self.info.enabled:
                    self.spare = batch
                elif self.info.enabled and self.spare is not None:
                    loss, weight = task.idle_loss(self.spare), 0.0
            if loss is None:
                return
            loss, values = task.loss_values(loss)
            self.scaler.scale(loss * weight).backward()
        if weight:
            self.loss_sum = values if self.loss_sum is None else self.loss_sum + values
            self.learned += 1

    def _optimizer_step(self) -> bool:
        """Apply the accumulated gradient and log; False when no rank had a batch to learn from."""
        cfg, p = self.cfg, self.p
        names = (*self.task.loss_parts, *self.task.step_metrics)
        loss_sum = self.loss_sum if self.loss_sum is not None else torch.zeros(1 + len(names), device=self.device)
        totals = torch.cat([loss_sum, torch.tensor([float(self.learned)], device=self.device)])
        if self.info.enabled:
            dist.all_reduce(totals)
        self.loss_sum, learned = None, self.learned
        totals = totals.tolist()  # the one host sync of the step
        if totals[-1] == 0:
            self.optimizer.zero_grad(set_to_none=not self.keep_grads)
            return False
        if not math.isfinite(value := totals[0] / totals[-1]):  # before the update: the weights stay as saved
            raise diverged(f"loss is {value} at step {p.step + 1} (epoch {p.epoch})", self.out, cfg, self.precision,
                           untrained=p.step == 0)
        parts = {**self.task.step_info(), **self.scaler.watch(p.step + 1)}  # before the update: fp16 stuck stops
        schedule = self.task.lr_schedule or lr_at
        lr = schedule(p.step, *self.schedule, self.base_lr, self.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if getattr(cfg, "clip_grad", None):
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.task.model.parameters(), cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=not self.keep_grads)
        p.step += 1
        seen = learned * self.cfg.batch_size * self.info.world_size
        parts = {**{name: total / totals[-1] for name, total in zip(names, totals[1:-1])}, **parts}
        elapsed = max(time.perf_counter() - self.tick, 1e-9)
        self.monitor.step(p.step, p.epoch, value, lr, seen / elapsed, parts, min(1.0, self.waited / elapsed))
        self.tick, self.learned, self.waited = time.perf_counter(), 0, 0.0
        return True

    def _end_epoch(self) -> None:
        """Evaluate the finished epoch; checkpoint when due or best."""
        self.p.epoch, self.p.batches_done = self.p.epoch + 1, 0
        metrics = {} if self.task.eval_steps else self._evaluate(time.perf_counter() - self.epoch_tick)
        self.epoch_tick = time.perf_counter()
        best = bool(metrics) and self.task.best_metric in metrics
        if best or (self.p.epoch % getattr(self.cfg, "save_every", 1) == 0 and self.p.epoch < self.cfg.epochs):
            self.save(metrics)

    def _stopped_in_work(self) -> bool:
        """After an evaluation or an epoch's end: whether a stop signal came during it, on any rank (a collective).
        The run stops there rather than after one more step, as the Ctrl-C line said (an evaluation takes minutes)."""
        self.signalled = any_rank(self.stop.signal is not None, self.device)
        return self.signalled

    def _evaluate(self, seconds: float | None = None) -> dict:
        # every rank, first: a main-only scoring would mark the step scored on the main rank alone
        check_weights(self.task.model, self.info.enabled, self.p.step, self.out, self.cfg, self.precision)
        failure, metrics = None, {}
        if self.evaluated_step != self.p.step:
            try:
                self.stop.evaluating = True
                sync_stats(self.task.model)  # every rank scores the model that is saved
                metrics = self.task.evaluate()
                self.stop.scored = bool(metrics)  # a Ctrl-C's line under torchrun times the evaluations that score
            except (TrainingError, LomarError) as exc:  # the evaluation's data failed, not the training
                failure = exc
            finally:
                self.stop.evaluating = False
        # every rank, as a main-only scoring would fail alone: all join the save that keeps what it trained
        if any_rank(failure is not None, self.device):
            self.save()
            raise failure or TrainingError("another process's evaluation failed; see its error")
        if metrics:
            self.evaluated_step = self.p.step
            record_evaluation(self, metrics, seconds)
        return metrics

    def _finish(self, preempted: bool) -> int:
        self.stop.ending = True
        *at, path = self.saved  # a stop right after an evaluation's checkpoint: that one, not a second copy
        path = path if preempted and tuple(at) == (self.p.step, self.p.epoch, self.p.batches_done) else self.save()
        if not preempted:
            evaluate_end(self)
        self.monitor.close()
        # Collective: the other ranks wait for the main one's files, and stop with it if it fails.
        save_on_main_rank(lambda: report_end(self, path, preempted), self.info.is_main, self.device)
        return self.stop.exit_code if preempted else 0


def run(config, make_task: type[Task]) -> int:
    """Run (or resume) the training ``make_task(config, info, device)`` builds; the process exit code."""
    # from the lomar command's start, or this call's
    stop = StopFlag(getattr(config, "time_limit", None), command=config.COMMAND)
    info, device = join_group(config.device)  # what fails before the first step: a one-line error, exit 2
    out, name = Path(main_rank_out(config)), config.COMMAND  # one run folder: a default's time is rank 0's
    lock, task, trainer = RunLock(out, source_of(config, "out")), None, None
    try:
        if info.is_main:  # only the main process writes into the folder
            lock.acquire()
        # --resume auto falls back to the newest intact checkpoint-* when last.pt is gone or unreadable
        point = resume_point(config.resume, out, config.overwrite, getattr(config, "resume_point", None))
        config.resume_point = point  # as read under the lock: the precision it trained in is the run's (Task too)
        resume = point.path if point is not None else None
        if point is not None and info.is_main:
            fresh = point.resume == "auto" and point.path is None and getattr(config, "notes_new_run", True)
            say_notes(config, name, point.notes + [f"nothing to resume in {out}: a new run starts"] * fresh)
        try:
            if resume is not None and info.is_main:
                check_no_rewind(resume, out, config.overwrite, point, getattr(config, "in_file", {}))
            end = run_end(config, make_task, point, out, info.world_size)  # then nothing to build: the run ends there
            if end is None:
                use_threads(config.threads)
                saved = preload(resume, device)  # a checkpoint that cannot resume is refused before the build
                seed_everything(config.seed)  # the same initial weights on every rank
                with building(saved) as built:  # a Task refusing the checkpoint for its data: before its model
                    task = make_task(config, info, device)
                if info.enabled:  # then a stream of its own for each: drop path, mixup, augmentation in this process
                    seed_everything(config.seed + info.rank)
                trainer = _Run(config, task, info, device, stop)
                if resume is not None:
                    restore(trainer, resume, saved, point.meta, built.loaded)
                del saved  # the run would hold the whole checkpoint to its end
        except (ValueError, FileNotFoundError) as exc:  # a library's (a model's build) names its parameters
            raise UsageError(in_flags(str(exc), flags_by_setting(config))) from None
        step, epoch = (end.step, end.epoch) if end else (trainer.p.step, trainer.p.epoch)
        if info.is_main:
            prepare_run_folder(config, task or make_task, resume, step, epoch,
                               finished=end is not None or step >= trainer.last_step)
        with stop.owning_compile_failures():  # --compile's compilers, killed by a signal to the process group
            code = trainer.train() if end is None else answer_at_end(make_task, out, step, step,
                                                                     end.steps_per_epoch, config, info.is_main, device)
        if info.enabled:  # leave together: a rank that tears gloo down while rank 0 still exports can abort
            dist.barrier()
        return code
    except BaseException:
        if (monitor := getattr(trainer, "monitor", None)) is not None:  # else its metrics.jsonl stays open
            monitor.abandon()
        lock.release(remove_if_empty=True)
        raise
    finally:
        stop.restore()
        if task is not None:
            shut_down_workers(*(getattr(task, k, None) for k in ("train_loader", "val_loader")))
        lock.release()
        cleanup_distributed()
