"""The images a run upscaled: files whose shorter side is under the training crop's size, so that every crop of them
is enlarged (a 120x90 thumbnail in a 448 px pretraining), each counted once over the whole run and every process,
and said in the final line: :class:`UpscaledFiles`.

Counted where the batches arrive, from the size each item carries (its ``"source"``, read by the loader worker that
decoded it or read its header): no pass over the data's headers at start-up, and right whatever the loader's workers,
since every item reaches its process's loop. A file is kept as a 63-bit hash of its path, and a checkpoint holds each
once, in one int64 tensor however many processes read it: at 448 px half of ImageNet's images are under the crop, and
a list of each rank's files, every rank reading most of them over a long run, would take tens of seconds to save and
load.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch
import torch.distributed as dist

from lomar.data.small_images import smaller, upscaled_line
from lomar.train.distributed import DistInfo

__all__ = ["UpscaledFiles"]

log = logging.getLogger("lomar.train")


def _key(path: str) -> int:
    """A path's 63-bit hash, the same in every process (``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big") >> 1


class UpscaledFiles:
    """The files smaller than ``size`` px on their shorter side that the run read, and the smallest of them (shorter
    side, then area). ``say``: warn of the first one met (the main process: the user learns of it at the run's first
    such batch, not at its end)."""

    def __init__(self, size: int, say: bool = False):
        self.size, self.say, self.warned = size, say, False
        self.keys: set[int] = set()  # this process's since the last gather
        self.saved = torch.empty(0, dtype=torch.int64)  # every process's up to the last gather, sorted, each once
        self.smallest: tuple[int, int, str] | None = None  # (height, width, path)

    def count(self, files: list[tuple[str, int, int]]) -> None:
        """``files``: (path, height, width) of each image a batch read."""
        for path, height, width in files:
            if min(height, width) >= self.size:
                continue
            if self.say and not self.warned:
                self.warned = True
                log.warning("%s is %dx%d, smaller than the %d px crop: upscaled; the run's last line counts every such "
                            "image", path, width, height, self.size)
            self.keys.add(_key(path))
            self.smallest = smaller(self.smallest, (height, width, path))

    def gathered(self, info: DistInfo) -> dict:
        """Every process's files so far, for a checkpoint: ``{"keys": int64 (N,) sorted, each once, "smallest":
        [height, width, path] or None}`` (a collective under DDP; every process keeps the union)."""
        mine = {"keys": torch.from_numpy(np.fromiter(self.keys, np.int64, len(self.keys))),
                "smallest": self.smallest}
        ranks: list = [mine]
        if info.enabled:
            ranks = [None] * info.world_size
            dist.all_gather_object(ranks, mine)
        self.saved = torch.unique(torch.cat([self.saved, *(part["keys"] for part in ranks)]))
        self.keys = set()
        for part in ranks:
            self.smallest = smaller(self.smallest, part["smallest"])
        return {"keys": self.saved, "smallest": list(self.smallest) if self.smallest else None}

    def restore(self, saved: dict | None) -> None:
        """Go on from a checkpoint's :meth:`gathered` (None: a checkpoint that holds none), in every process
        whatever their count: the next gather holds each file once."""
        self.keys, self.saved, self.smallest = set(), torch.empty(0, dtype=torch.int64), None
        if saved:
            self.saved = torch.as_tensor(saved["keys"], dtype=torch.int64).cpu()
            self.smallest = tuple(saved["smallest"]) if saved["smallest"] else None
            self.warned = len(self.saved) > 0  # the run's first said it

    def summary(self, saved: dict | None) -> str:
        """'N image(s) smaller than the S px crop upscaled, the smallest WxH (PATH)' of ``saved``, the whole run's and
        every process's (:meth:`gathered`), or '' when none was."""
        if not saved or not len(saved["keys"]) or not saved["smallest"]:
            return ""
        return upscaled_line(len(saved["keys"]), self.size, "crop", saved["smallest"])

