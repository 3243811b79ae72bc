"""Images smaller than the size a transform brings them to, so enlarged, counted from the (height, width) each item
read tells (a pretraining item's ``"source"``, :class:`lomar.data.collate.LabelledBatch`'s ``sources``), the smallest
named in one line (:func:`upscaled_line`). A training run counts each file once over the run and its processes
(``lomar.train.upscaled_files``); knn and linprobe read each image of a split once, as finetune's evaluation and
``pretrain --knn-every``'s k-NN do (counted at their first): :class:`SmallImages`.
"""

from __future__ import annotations

from lomar.values import counted

__all__ = ["SmallImages", "smaller", "upscaled_line"]

Sized = tuple[int, int, str]  # (height, width, path)


def smaller(a: Sized | list | None, b: Sized | list | None) -> Sized | None:
    """The smaller image of ``a`` and ``b`` (shorter side, then area; ``a`` of two alike), either None for none, a
    list where a checkpoint or another process gave it."""
    given = [tuple(s) for s in (a, b) if s is not None]
    return min(given, key=lambda s: (min(s[0], s[1]), s[0] * s[1]), default=None)  # type: ignore[return-value]


def upscaled_line(count: int, size: int, what: str, smallest: Sized | list) -> str:
    """'N image(s) smaller than the S px WHAT upscaled, the smallest WxH (PATH)'."""
    height, width, path = smallest
    return (f"{counted(count, 'image')} smaller than the {size} px {what} upscaled, the smallest {width}x{height} "
            f"({path})")


class SmallImages:
    """The images of one read of a split whose shorter side is under ``size`` (knn's and linprobe's resize): their
    count and the smallest."""

    def __init__(self, size: int):
        self.size, self.count, self.smallest = size, 0, None

    def add(self, sources) -> None:
        """``sources``: (path, height, width) of each image read."""
        for path, height, width in sources:
            if min(height, width) < self.size:
                self.count += 1
                self.smallest = smaller(self.smallest, (height, width, path))

    def join(self, count: int, smallest: Sized | list | None) -> None:
        """Add another process's share (its ``count`` and ``smallest``)."""
        self.count += count
        self.smallest = smaller(self.smallest, smallest)

    def line(self) -> str:
        """:func:`upscaled_line` of the resize, or '' when none was smaller."""
        return upscaled_line(self.count, self.size, "resize", self.smallest) if self.count else ""
