"""Preemption: SIGTERM / SIGUSR1 (what cluster schedulers send) become "checkpoint and exit 0";
Ctrl-C (SIGINT) writes the same checkpoint and exits 130. A second Ctrl-C interrupts at once.
``--time-limit`` stops the run the same way at the last step boundary from which one more step and the final save
still end within it, and exits 75 (0 under torchrun). Imports no torch: ``lomar`` notes its start here first."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from time import monotonic

from lomar.errors import first_on_machine
from lomar.values import duration_text  # no torch here, nor typing: `lomar --help` imports this module

__all__ = ["StopFlag", "Terminated", "TIME_LIMIT_EXIT", "signals_to_take", "ignore_stop_signals", "any_rank_stopping",
           "shut_down_workers", "mark_command_start", "take_command_start", "process_age", "STOP_SIGNALS",
           "first_save_estimate", "compile_seconds"]

# sysexits' EX_TEMPFAIL, "try again later": the work is not done and resuming it is all it takes. A wrapper tells it
# from 0 (finished, or stopped by the scheduler's own signal, which the scheduler knows of) and from 1 (failed).
# Not under torchrun: it takes any code but 0 for a failure, reports one for every process and, given --max-restarts,
# restarts them, and the restarted run resumes with a limit of its own and trains past the one that stopped it.
TIME_LIMIT_EXIT = 75


# Before a run's first save is measured, the save is taken to write the weights and AdamW's two moments at this rate
# (a slow network file system's; a local disk writes several times faster), 10 s for ViT-Base's 1 GB, and to spend
# SAVE_OTHER_S on the rest: pretraining's figure, the sync (1.7-2.8 s for the demo's 0.8M parameters on a busy CPU).
SAVE_BYTES_PER_S, SAVE_OTHER_S = 100e6, 2.0
STEPS_KEPT = 8  # the time limit's margin: the longest of the last this many steps (and, apart, of work intervals)

# SIGTERM, SIGUSR1 (none on Windows), SIGINT
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))


def signals_to_take() -> tuple[int, ...]:
    """The stop signals a command handles: all but a Ctrl-C its parent ignores, which stays ignored as Python leaves
    it (a shell starts a background job with SIGINT ignored, so that a Ctrl-C meant for the foreground spares it)."""
    return tuple(sig for sig in STOP_SIGNALS if sig != signal.SIGINT or signal.getsignal(sig) is not signal.SIG_IGN)


_command_start: list[float] = []  # when the lomar command began (monotonic), until a run takes it


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGUSR1 outside a training loop (which checkpoints on them instead): the command unwinds as on
    Ctrl-C, so that its temporary files are removed and its run folder's lock released, and exits 128 + the
    signal (143 for SIGTERM). SIGUSR1 is what a scheduler sends ahead of a time limit (SLURM's --signal); left
    to its default action it would kill a run still starting (reading its data, fitting a tokenizer) unannounced."""


def _compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is torch.compile's backend failing (inductor's compile error among them); torch._dynamo is
    looked up, not imported: without it loaded, nothing was compiled."""
    dynamo = sys.modules.get("torch._dynamo.exc")
    return dynamo is not None and isinstance(exc, dynamo.BackendCompilerFailed)


# torch.compile's timings of a frame's compile and of a backward's deferred one (in torch._dynamo.utils's
# compilation_time_metrics: seconds, one entry each; the other keys time parts of these two)
_COMPILE_TIMINGS = ("_compile.compile_inner", "backward._backward_impl")


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process (0.0 before anything was compiled). torch._dynamo is
    looked up, not imported: without it loaded, nothing was compiled."""
    timings = getattr(sys.modules.get("torch._dynamo.utils"), "compilation_time_metrics", None)
    if not isinstance(timings, dict):
        return 0.0
    return float(sum(sum(timings.get(key) or ()) for key in _COMPILE_TIMINGS))


def process_age() -> float:
    """Seconds since this process started, as Linux's /proc tells (0.0 where it cannot)."""
    try:
        with open("/proc/self/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # starttime, field 22: clock ticks after boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc (macOS), no CLOCK_BOOTTIME
        return 0.0


def first_save_estimate(state_bytes: float) -> float:
    """The seconds a run's save is taken to need before one is timed, for a checkpoint of ``state_bytes``."""
    return state_bytes / SAVE_BYTES_PER_S + SAVE_OTHER_S


def mark_command_start(started: float) -> None:
    """The lomar command began at ``started`` (a :func:`monotonic` reading): the first run it starts counts its
    --time-limit from then."""
    _command_start[:] = [started]


def take_command_start() -> float | None:
    """The command's start for the run that asks first, None after (and for a run not started by a command)."""
    return _command_start.pop() if _command_start else None


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT, or due when the time left of ``time_limit`` would not hold one more step
    and the final save: finish the step, checkpoint, exit (see exit_code). The limit counts from ``started`` (a
    :func:`monotonic` reading): by default the lomar command's start (:func:`mark_command_start`), else now."""

    def __init__(self, time_limit: float | None = None, started: float | None = None, command: str = ""):
        self.signal: int | None = None
        self.command = command  # the lomar command whose run this is, for the line a Ctrl-C gets at once
        self.ending = False  # set once the training is done: a Ctrl-C then has no step to end, only the run's end
        self.evaluating = False  # set during a run's evaluation, after which a stop signal stops it (not a step later)
        self.scored = False  # an evaluation scored in the current interval (one that returns nothing scores nothing)
        self.previous: dict = {}
        self.time_limit, self.timed_out = time_limit, False  # timed_out: what the ranks agreed (any_rank_stopping)
        started = started if started is not None else take_command_start()
        self.deadline = None if time_limit is None else (monotonic() if started is None else started) + time_limit
        # The margin's measures, between two stop agreements: the last few steps' seconds (the first interval, with
        # the loop's start-up, until a second), the last few steps that followed an evaluation, a save or an epoch's
        # end (its loader's start-up; the longest, as an evaluation due every few epochs is the one that passes a
        # limit), and the last save's seconds (before one, estimated: see install). An interval's seconds leave out
        # what torch.compile spent in it (compiled: compile_seconds at its start), a cost paid once: a compiled run's
        # first step (tens of seconds on a CPU) or a recompile (an evaluation's, a new shape's) taken for what the
        # next step costs would stop the run with most of its limit unused. Of the work intervals, those that held an
        # evaluation that scored are kept apart too (evaluations): an epoch's end that scores nothing (pretraining's
        # between two k-NN scorings) times no evaluation.
        self.steps: deque[float] = deque(maxlen=STEPS_KEPT)
        self.works: deque[float] = deque(maxlen=STEPS_KEPT)
        self.evaluations: deque[float] = deque(maxlen=STEPS_KEPT)
        self.first_step, self.save_s, self.mark, self.compiled = None, None, None, 0.0
        self.after_work = False
        self.left = self.needed = 0.0  # at the stop: the seconds left of the limit, and those a step and save needed
        self.needed_for = ""
        self.torchrun_wait: tuple[int, str, bool] | None = None  # under torchrun: _torchrun_wait()'s, read at install

    def install(self, model=None) -> None:
        """The signal handlers, and the start of the steps' clock; ``model``: its parameters size the first save."""
        self.mark, self.compiled = monotonic(), compile_seconds()
        if model is not None and self.save_s is None:
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            self.save_s = first_save_estimate(3 * size)  # the weights and AdamW's two moments
        self.torchrun_wait = _torchrun_wait() if "TORCHELASTIC_RUN_ID" in os.environ else None
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (e.g. a run started from a thread)
        for sig in signals_to_take():
            self.previous[sig] = signal.signal(sig, self._handle)

    @contextlib.contextmanager
    def saving(self):
        """Time a checkpoint save: the time limit's margin keeps the last one's seconds for the final save."""
        start = monotonic()
        try:
            yield
        finally:
            self.save_s = monotonic() - start

    @contextlib.contextmanager
    def owning_compile_failures(self):
        """torch.compile's first step builds C++ in child compilers of this process group, which a SIGTERM or Ctrl-C
        sent to the group (a scheduler's, a terminal's) kills too: the step then fails, after this flag was set, with
        inductor's compile error, a traceback of thousands of lines. That failure is the signal's: it unwinds as the
        signal does outside a training loop, in one line (:class:`Terminated`, or KeyboardInterrupt for Ctrl-C)."""
        try:
            yield
        except Exception as exc:
            if self.signal is None or not _compile_failure(exc):
                raise
            raise (KeyboardInterrupt() if self.signal == signal.SIGINT else Terminated(self.signal)) from None

    def due(self, work_ahead: bool) -> int:
        """This process's stop: 2 for a signal, 1 when the time left of the limit would not hold the next step (with
        ``work_ahead``: the evaluation, save or epoch's end that comes before it) and the final save, else 0. Ends a
        step's interval."""
        now, compiled = monotonic(), compile_seconds()
        if self.mark is not None:
            took = max(0.0, now - self.mark - (compiled - self.compiled))
            if self.first_step is None:
                self.first_step = took
            elif self.after_work:
                self.works.append(took)
                if self.scored:
                    self.evaluations.append(took)
            else:
                self.steps.append(took)
        self.mark, self.after_work, self.compiled, self.scored = now, work_ahead, compiled, False
        if self.signal is not None:
            return 2
        if self.deadline is None:
            return 0
        save = self.save_s or 0.0
        step = max(self.steps) if self.steps else self.first_step or 0.0
        self.left, self.needed = self.deadline - now, (max([step + save, *self.works]) if work_ahead else step) + save
        self.needed_for = ("the epoch's end or evaluation due, " if work_ahead else "") + "one more step and the save"
        return int(self.left <= 0 or self.left < self.needed)

    def restore(self) -> None:
        """Give the handlers back, so an in-process caller's own handling resumes."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a signal on another rank"

    def stopped_at(self, step: int) -> str:
        """Why the run stopped at ``step``, and for the time limit, the margin it kept."""
        if not self.timed_out:
            return f"stopped by {self.name} at step {step}"
        limit = f"time limit {duration_text(self.time_limit)}: stopped at step {step}"
        if self.left <= 0:  # the start-up, or a step or evaluation longer than the ones before, passed it
            return f"{limit}, {duration_text(-self.left)} past it" if math.isfinite(self.left) else f"{limit}, past it"
        return (f"{limit} with {duration_text(self.left)} left for the save ({self.needed_for} would take "
                f"{duration_text(self.needed)})")

    @property
    def exit_code(self) -> int:
        """75 at the time limit (0 under torchrun: see TIME_LIMIT_EXIT), 130 after Ctrl-C (the shell's convention),
        else 0: a preempted run is not a failure."""
        if self.timed_out:
            return 0 if "TORCHELASTIC_RUN_ID" in os.environ else TIME_LIMIT_EXIT
        return 130 if self.signal == signal.SIGINT else 0

    def _handle(self, signum, frame) -> None:
        if self.signal is None:  # the first signal is the reason reported
            self.signal = signum
        if signum == signal.SIGINT:  # the next Ctrl-C is not deferred: it interrupts
            if first_on_machine():
                # said now: the step, the save and the figures take seconds to minutes, in which a silent terminal
                # invites a second Ctrl-C. os.write: a print here could land inside a write to the same stream
                said = " ".join(filter(None, ("lomar", self.command)))
                work = "evaluation" if self.evaluating else "step"
                what = ("the training is done; finishing the run's last checkpoint, evaluation and files (Ctrl-C "
                        "again stops at once, without them)" if self.ending else f"saving a checkpoint at the end of "
                        f"this {work}, then stopping (Ctrl-C again stops at once, without it)" + self._torchrun_kill())
                # an exception here would be raised inside the step: a stderr gone (`2>&1 | tee log`, whose tee the
                # same Ctrl-C ended) must not cost the checkpoint
                with contextlib.suppress(OSError):
                    os.write(2, f"{said}: Ctrl-C: {what}\n".encode())
            previous = self.previous.get(signal.SIGINT)
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    def _torchrun_kill(self) -> str:
        """What a Ctrl-C's line adds under torchrun when a step and the save take longer than torchrun waits for its
        processes: a terminal's Ctrl-C reaches torchrun alone (its processes run in sessions of their own), which
        passes it on and kills them that many seconds later, before the checkpoint. The run's first step (its loader's
        start-up, a compile) and first evaluation have no earlier one to go by: the line says it cannot tell, unless
        their time so far already passes torchrun's wait."""
        if self.torchrun_wait is None:
            return ""
        grace, said, told = self.torchrun_wait
        work = "an evaluation" if self.evaluating else "a step"
        # the current work's seconds so far (with what torch.compile spent: torchrun's clock counts it); after an
        # evaluation or an epoch's end, the interval since the mark holds that work, done, and the step after it
        so_far = monotonic() - self.mark if self.mark is not None and (self.evaluating or not self.after_work) else 0.0
        step = max(self.steps) if self.steps else self.first_step
        # an evaluation's time is in the interval of the step after it: the longest such, while one runs (a step
        # over: a run stops right after an evaluation)
        took = (max(self.evaluations) if self.evaluations else None) if self.evaluating else step
        save = self.save_s or 0.0
        if took is None and so_far + save < grace:
            first = "first evaluation" if self.evaluating else "first step"
            lost = ("unless it was launched with a --shutdown-timeout over the time they take, the checkpoint may be "
                    "lost" if told else "if they take longer the checkpoint may be lost (this torch's torchrun has no "
                    "--shutdown-timeout)")
            return (f"; but torchrun kills its processes {grace} s after a Ctrl-C ({said}), and how long the run's "
                    f"{first} ({duration_text(so_far)} so far) and a save take cannot be told yet: {lost}")
        needed = max(took or 0.0, so_far) + save
        if needed < grace:
            return ""
        lost = (f"unless it was launched with a --shutdown-timeout over {math.ceil(needed)}, the checkpoint may be lost"
                if told else "the checkpoint may be lost (this torch's torchrun has no --shutdown-timeout)")
        about = "about" if took is not None and took >= so_far else "over"  # over: the work is not done yet
        return (f"; but torchrun kills its processes {grace} s after a Ctrl-C ({said}) and {work} and a save take "
                f"{about} {duration_text(needed)} here: {lost}")


# torchrun's wait between passing a stop signal on to its processes and killing them: its --shutdown-timeout (an
# option of recent PyTorch: 2.14.1 has it) or else these variables (in this order), else 30 s, fixed in older releases
_TORCHRUN_GRACE_S, _TORCHRUN_GRACE_VARIABLES = 30, ("PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")


def _torchrun_wait() -> tuple[int, str, bool]:
    """torchrun's wait (above), what sets it (a --shutdown-timeout on torchrun's command line is not seen by its
    processes), and whether it can be told another: a torch without that option waits 30 s, whatever the variables
    say."""
    from torch.distributed.launcher.api import LaunchConfig  # torch: not for `lomar --help`, which imports this module

    if "shutdown_timeout" not in LaunchConfig.__dataclass_fields__:
        return _TORCHRUN_GRACE_S, "fixed in this torch release", False
    for name in _TORCHRUN_GRACE_VARIABLES:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name]), name, True
    return _TORCHRUN_GRACE_S, "its --shutdown-timeout's default", True


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1/SIGINT to the main process: schedulers (and Ctrl-C)
    signal the whole process group, and a worker dying on it would crash the run instead of
    checkpointing it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def any_rank_stopping(stop: StopFlag, device, work_ahead: bool) -> bool:
    """True when this process or any other rank was signalled or is due to stop for the time limit
    (:meth:`StopFlag.due`, told ``work_ahead``: an evaluation, a save or an epoch's end comes before the next step):
    the step's one stop agreement (a collective on ``device`` under DDP), whose MAX makes
    every rank stop at the same step though each decides from its own clock, and sets ``stop.timed_out`` alike on
    every rank. A signal anywhere is the reason over the limit: the scheduler that sent it is stopping the job."""
    from lomar.train.distributed import rank_max  # torch: not for `lomar --help`, which imports this module

    due = int(rank_max(stop.due(work_ahead), device))
    stop.timed_out = due == 1
    return due > 0


def shut_down_workers(*loaders) -> None:
    """Stop the persistent workers of DataLoaders now.

    Workers ignore SIGTERM (see :func:`ignore_stop_signals`), and Python's exit-time clean-up
    stops leftover worker processes with exactly that signal, then waits for them: a loader
    whose iterator outlives the run (e.g. held by a reference cycle) would hang the exit
    forever. Telling the workers to finish, as the iterator's own clean-up does, avoids that.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # persistent workers live in this iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None
