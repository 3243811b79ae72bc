"""Data order for training: a resumable, rank-sharded permutation per epoch (pretraining and finetuning)."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler"]


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` keys (or plain indices, ``keys=False``): a (seed, epoch)
    permutation, this rank's share of it.

    Rank r takes positions r, r+W, r+2W, ... so that batch b of every rank together holds
    exactly the items of batch b of a single process with a W times larger batch. The keys let
    a dataset seed each sample's augmentation by (epoch, index); plain indices suit a dataset
    that draws from the process's random streams (whose state the checkpoint saves).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, keys: bool = True):
        self.size, self.seed, self.rank, self.world, self.keys = size, seed, rank, world_size, keys
        self.epoch, self.skip, self.epochs, self.per_epoch = 0, 0, 1, size // world_size

    def set_epoch(self, epoch: int, skip: int = 0, epochs: int = 1, per_epoch: int | None = None) -> None:
        """``skip``: items of this rank's share already consumed (resume mid-epoch). ``epochs``: how many
        epochs, from ``epoch`` on, one pass yields back to back, each its first ``per_epoch`` items (default
        all of this rank's share): one loader iterator then serves them all, and its workers prefetch
        across an epoch's end instead of starting empty at the next. Keys are per epoch, so a sample is
        the same either way."""
        share = self.size // self.world
        each = share if per_epoch is None else per_epoch
        if not 0 < each <= share or not 0 <= skip <= each or epochs < 1:
            raise ValueError(f"set_epoch(skip={skip}, epochs={epochs}, per_epoch={per_epoch}) does not fit "
                             f"an epoch of {share} items")
        self.epoch, self.skip, self.epochs, self.per_epoch = epoch, skip, epochs, each

    def __len__(self) -> int:
        return self.per_epoch * self.epochs - self.skip

    def __iter__(self):
        for epoch in range(self.epoch, self.epoch + self.epochs):
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            mine = order[self.rank:self.size - self.size % self.world:self.world][:self.per_epoch]
            for index in mine[self.skip if epoch == self.epoch else 0:].tolist():
                yield (index, epoch) if self.keys else index
