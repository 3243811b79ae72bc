"""The images a run upscaled: files whose shorter side is under the training crop's size, so that every crop of them
is enlarged (a 120x90 thumbnail in a 448 px pretraining), each counted once over the whole run and every process,
and said in the final line: :class:`UpscaledFiles`.

Counted where the batches arrive, from the size each item carries (its ``"source"``, read by the loader worker that
decoded it or read its header): no pass over the data's headers at start-up, and right whatever the loader's workers,
since every item reaches its process's loop. A file is kept as a 63-bit hash of its path, so that a set of thumbnails
costs 8 bytes an image in a checkpoint, not its path.
"""

from __future__ import annotations

import hashlib
import logging

import torch.distributed as dist

from lomar.train.distributed import DistInfo
from lomar.values import counted

__all__ = ["UpscaledFiles"]

log = logging.getLogger("lomar.data")


def _key(path: str) -> int:
    """A path's 63-bit hash, the same in every process (``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big") >> 1


class UpscaledFiles:
    """The files one process read that are smaller than ``size`` px on their shorter side, and the smallest of them
    (shorter side, then area). ``say``: warn of the first one met (the main process: the user learns of it at the
    run's first such batch, not at its end)."""

    def __init__(self, size: int, say: bool = False):
        self.size, self.say = size, say
        self.keys: set[int] = set()
        self.smallest: tuple[int, int, str] | None = None  # (height, width, path)

    def count(self, files: list[tuple[str, int, int]]) -> None:
        """``files``: (path, height, width) of each image a batch read."""
        for path, height, width in files:
            if min(height, width) >= self.size:
                continue
            if self.say and not self.keys:
                log.warning("%s is %dx%d, smaller than the %d px crop: upscaled; the run's last line counts every such "
                            "image", path, width, height, self.size)
            self.keys.add(_key(path))
            if self.smallest is None or _order(height, width) < _order(*self.smallest[:2]):
                self.smallest = (height, width, path)

    def gathered(self, info: DistInfo) -> list[dict]:
        """Every rank's files, in rank order, for a checkpoint (a collective under DDP)."""
        mine = {"keys": sorted(self.keys), "smallest": list(self.smallest) if self.smallest else None}
        if not info.enabled:
            return [mine]
        ranks: list = [None] * info.world_size
        dist.all_gather_object(ranks, mine)
        return ranks

    def restore(self, ranks: list[dict] | None, rank: int) -> None:
        """Go on from a checkpoint's :meth:`gathered` (None: one saved before they were kept): the first process
        takes every rank's files, so that a resume under another count of processes loses none."""
        self.keys, self.smallest = set(), None
        for part in (ranks or ()) if rank == 0 else ():
            self.keys.update(part["keys"])
            smallest = part["smallest"]
            if smallest and (self.smallest is None or _order(*smallest[:2]) < _order(*self.smallest[:2])):
                self.smallest = tuple(smallest)

    @staticmethod
    def summary(ranks: list[dict], size: int) -> str:
        """'N image(s) smaller than the S px crop upscaled, the smallest WxH (PATH)' over the whole run and every rank
        (:meth:`gathered`), or '' when none was."""
        keys = set().union(*(part["keys"] for part in ranks))
        smallest = min((part["smallest"] for part in ranks if part["smallest"]), key=lambda s: _order(s[0], s[1]),
                       default=None)
        if not keys or smallest is None:
            return ""
        height, width, path = smallest
        return (f"{counted(len(keys), 'image')} smaller than the {size} px crop upscaled, the smallest "
                f"{width}x{height} ({path})")


def _order(height: int, width: int) -> tuple[int, int]:
    return min(height, width), height * width
