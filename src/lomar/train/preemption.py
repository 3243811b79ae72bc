"""Preemption: SIGTERM / SIGUSR1 (what cluster schedulers send) become "checkpoint and exit 0";
Ctrl-C (SIGINT) writes the same checkpoint and exits 130. A second Ctrl-C interrupts at once."""

from __future__ import annotations

import signal
import threading

import torch

from lomar.train.distributed import any_rank

__all__ = ["StopFlag", "ignore_stop_signals", "any_rank_stopping", "shut_down_workers"]


_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT: finish the step, checkpoint, exit (see exit_code)."""

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict = {}

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
    def exit_code(self) -> int:
        """130 after Ctrl-C (the shell's convention), else 0: a preempted run is not a failure."""
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
    """True when this process or any other rank was signalled (a collective under DDP)."""
    return any_rank(stop.signal is not None, device)


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
