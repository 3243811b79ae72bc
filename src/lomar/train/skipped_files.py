"""The files a run skipped (unreadable or unusable images), each counted once over the whole run, and the stop of a
run that skipped too many: :class:`SkippedFiles`."""

from __future__ import annotations

import itertools

import torch.distributed as dist

from lomar.data.collate import UNREADABLE_LIMIT, BadDataTracker
from lomar.train.distributed import DistInfo
from lomar.train.task import TrainingError
from lomar.values import counted

__all__ = ["SkippedFiles"]


class SkippedFiles:
    """The files one process skipped (``Task.skipped``), each counted once over the whole run (a checkpoint carries
    them: :meth:`gathered`, :meth:`restore`); more than ``threshold`` of the files the process reads an epoch
    (``batches`` of ``batch_size``) stops the run (:class:`BadDataTracker`'s exact rule). ``warn``: log each file
    once (else the data did)."""

    def __init__(self, batches: int, batch_size: int, warn: bool, threshold: float = UNREADABLE_LIMIT):
        self.tracker = BadDataTracker(batches * batch_size, warn=warn)
        self.batches, self.batch_size, self.threshold = batches, batch_size, threshold

    def count(self, files: list[str]) -> None:
        tracker = self.tracker
        tracker.update(files, self.batch_size)
        try:
            tracker.check(self.threshold)
        except ValueError:  # said in what a user can count: the epoch's reads, not the data's files
            raise TrainingError(f"{counted(tracker.count, 'image')} could not be used so far, over "
                                f"{self.threshold:.0%} of the {tracker.total} an epoch reads ({self.batches} "
                                f"batch(es) of {self.batch_size} per process), e.g. {next(iter(tracker.bad))}; fix "
                                f"or remove them") from None

    def gathered(self, info: DistInfo) -> list[list[str]]:
        """Every rank's skipped files, in rank order, for a checkpoint (a collective under DDP)."""
        # plain str: a dataset's Skipped line (a str subclass) is a global a weights-only load refuses
        mine = [str(file) for file in self.tracker.bad]
        if not info.enabled:
            return [mine]
        files: list = [None] * info.world_size
        dist.all_gather_object(files, mine)
        return files

    def restore(self, ranks: list[list[str]] | None, rank: int) -> None:
        """Go on from this rank's files of a checkpoint's :meth:`gathered` (None: one saved before they were kept)."""
        self.tracker.bad = dict.fromkeys(ranks[rank] if ranks and rank < len(ranks) else ())

    @staticmethod
    def summary(ranks: list[list[str]]) -> str:
        """'N unusable image(s) skipped, e.g. FILE' over the whole run, or '' when none was. ``ranks``: every rank's
        files (:meth:`gathered`), so that the main rank's line counts the run's, not its own alone."""
        files = dict.fromkeys(itertools.chain.from_iterable(ranks))
        return f"{len(files)} unusable image(s) skipped, e.g. {next(iter(files))}" if files else ""
