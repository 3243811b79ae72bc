"""A task's batches for one epoch after another, from one loader iterator across epochs where the task can:
:class:`EpochStream`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from lomar.train.task import Task

__all__ = ["EpochStream"]


class EpochStream:
    """A task's batches for one epoch after another. Where the task can, one loader iterator serves the
    rest of the run: its workers then prefetch on across an epoch's end. A new iterator per epoch starts
    with every worker empty, and the step waits a whole batch of one worker's decoding at every epoch
    (1.3 s of a 4 s epoch in ``benchmarks/README.md``'s test)."""

    def __init__(self, task: Task):
        self.task, self.batches, self.until = task, None, 0

    def epoch(self, epoch: int, done: int, epochs: int, per_epoch: int) -> Iterator:
        """Batches ``done`` to ``per_epoch`` of ``epoch`` (``epochs`` left in the run, this one included)."""
        if self.batches is None or epoch >= self.until or done:
            self.close()
            self.until = epoch + self.task.set_epoch(epoch, done, epochs, per_epoch)
            self.batches = self.task.batches()
        return itertools.islice(self.batches, per_epoch - done)

    def close(self) -> None:
        """Stop the batches' readers (a batch-ahead thread, the loader's prefetch)."""
        if hasattr(self.batches, "close"):
            self.batches.close()
        self.batches = None
