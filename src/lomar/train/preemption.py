"""Preemption: SIGTERM / SIGUSR1 (what cluster schedulers send) become "checkpoint and exit 0";
Ctrl-C (SIGINT) writes the same checkpoint and exits 130. A second Ctrl-C interrupts at once.
``--time-limit`` stops the run the same way at the first step past it, and exits 75 (0 under torchrun)."""

from __future__ import annotations

import os
import signal
import threading
from time import monotonic

import torch

from lomar.train.distributed import rank_max
from lomar.values import duration_text

__all__ = ["StopFlag", "TIME_LIMIT_EXIT", "ignore_stop_signals", "any_rank_stopping", "shut_down_workers"]

# sysexits' EX_TEMPFAIL, "try again later": the work is not done and resuming it is all it takes. A wrapper tells it
# from 0 (finished, or stopped by the scheduler's own signal, which the scheduler knows of) and from 1 (failed).
# Not under torchrun: it takes any code but 0 for a failure, reports one for every process and, given --max-restarts,
# restarts them, and the restarted run resumes with a limit of its own and trains past the one that stopped it.
TIME_LIMIT_EXIT = 75


_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT, or due ``time_limit`` seconds after it is made (at the run's start):
    finish the step, checkpoint, exit (see exit_code)."""

    def __init__(self, time_limit: float | None = None):
        self.signal: int | None = None
        self.previous: dict = {}
        self.time_limit, self.timed_out = time_limit, False  # timed_out: what the ranks agreed (any_rank_stopping)
        self.deadline = None if time_limit is None else monotonic() + time_limit

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (e.g. a run started from a thread)
        for sig in _SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Give the handlers back, so an in-process caller's own handling resumes."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a signal on another rank"

    @property
    def reason(self) -> str:
        return f"time limit {duration_text(self.time_limit)} reached" if self.timed_out else f"stopped by {self.name}"

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
            previous = self.previous.get(signal.SIGINT)
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1/SIGINT to the main process: schedulers (and Ctrl-C)
    signal the whole process group, and a worker dying on it would crash the run instead of
    checkpointing it."""
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def any_rank_stopping(stop: StopFlag, device: torch.device) -> bool:
    """True when this process or any other rank was signalled or is past the time limit: the step's one stop
    agreement (a collective under DDP), which also sets ``stop.timed_out`` alike on every rank. A signal anywhere
    is the reason over the limit: the scheduler that sent it is stopping the job."""
    due = 2 if stop.signal is not None else int(stop.deadline is not None and monotonic() >= stop.deadline)
    due = int(rank_max(due, device))
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
