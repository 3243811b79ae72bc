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
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """``skip``: items of this rank's share already consumed (resume mid-epoch)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.size // self.world - self.skip

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        mine = order[self.rank:self.size - self.size % self.world:self.world]
        for index in mine[self.skip:].tolist():
            yield (index, self.epoch) if self.keys else index
