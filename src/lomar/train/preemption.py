"""Preemption: SIGTERM / SIGUSR1 (what cluster schedulers send) become "checkpoint and exit 0"."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

__all__ = ["StopFlag", "ignore_stop_signals", "any_rank_stopping", "shut_down_workers"]


class StopFlag:
    """Set by SIGTERM / SIGUSR1: finish the step, checkpoint, exit 0."""

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (e.g. a run started from a thread)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Give the handlers back, so an in-process caller's own handling resumes."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a signal on another rank"

    def _handle(self, signum, frame) -> None:
        if self.signal is None:  # the first signal is the reason reported
            self.signal = signum


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the main process: schedulers signal the whole
    process group, and a worker dying on it would crash the run instead of checkpointing it."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def any_rank_stopping(stop: StopFlag, device: torch.device) -> bool:
    """True when this process or any other rank was signalled (a collective under DDP)."""
    flag = torch.tensor(float(stop.signal is not None), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


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
