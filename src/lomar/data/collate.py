"""Batching: pretraining items, labelled images and dense targets, with unusable files skipped and counted.

A dataset marks a file it cannot use in the item's place (``None`` for an image, a :class:`Skipped`
name for a detection or segmentation sample) instead of raising, so one bad file never kills a
loader worker; the collate functions drop those items and report them in the batch (``bad``), and
:class:`BadDataTracker` counts them and fails a run when too many are bad.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from lomar.errors import exception_line

__all__ = ["collate_pretrain", "collate_labelled", "collate_labelled_refill", "refilled", "LabelledItem",
           "LabelledBatch", "Skipped", "split_skipped", "BadDataTracker", "UNREADABLE_LIMIT"]

log = logging.getLogger("lomar.data")

UNREADABLE_LIMIT = 0.1  # the share of a split's files that may be unreadable before a run or a score stops


class Skipped(str):
    """A sample the dataset could not use, in its place: the file and why, in one line."""

    @classmethod
    def warned(cls, exc: Exception, index: int, warned: set[int]) -> Skipped:
        """``exc``'s first line as the sample's place; a warning of it once per sample and process (``warned``:
        the indices warned of), not every epoch."""
        line = cls(exception_line(exc))
        if index not in warned:
            warned.add(index)
            log.warning("skipped image: %s", line)
        return line


def split_skipped(batch: list) -> tuple[list, list[Skipped]]:
    """(the usable items of ``batch``, its :class:`Skipped` ones), each in order."""
    skipped = [item for item in batch if isinstance(item, Skipped)]
    return [item for item in batch if not isinstance(item, Skipped)], skipped


class LabelledItem(tuple):
    """A class-folder item ``(image or None, label, path)`` that also carries ``source``: the (height, width) of the
    whole image read, None where unreadable. Three elements, the size an attribute: code unpacking an item into
    three works with it."""

    source: tuple[int, int] | None

    def __new__(cls, image, label: int, path: str, source: tuple[int, int] | None = None):
        item = super().__new__(cls, (image, label, path))
        item.source = source
        return item

    def __reduce__(self):  # a loader without batching pickles items from its workers: keep ``source``
        return LabelledItem, (*self, self.source)


class LabelledBatch(tuple):
    """``(images, targets)`` that also carries ``bad``: the skipped files (paths or :class:`Skipped` lines), and
    ``sources``: (path, height, width) of each image read whole (classification's items tell it), once each.
    Classification: images (B', 3, S, S), targets (B',); detection and segmentation: their collates'."""

    bad: list[str]
    sources: list[tuple[str, int, int]]

    def __new__(cls, images, targets, bad: list[str], sources: list[tuple[str, int, int]] | None = None):
        batch = super().__new__(cls, (images, targets))
        batch.bad, batch.sources = bad, sources or []
        return batch

    def __reduce__(self):  # loader workers pickle batches: keep ``bad`` and ``sources``
        return LabelledBatch, (self[0], self[1], self.bad, self.sources)


def refilled(good: list, size: int) -> list:
    """``good`` (the readable items of a batch, at least one) with the skipped places filled by copies of
    them in turn, back to ``size`` items: a training batch keeps its size (Mixup pairs images; DDP ranks
    step together)."""
    return good + [good[i % len(good)] for i in range(size - len(good))]


def collate_labelled(batch: list[tuple], refill: bool = False) -> LabelledBatch:
    """Items ``(image tensor or None, label, path)`` (a :class:`LabelledItem` tells its size) -> :class:`LabelledBatch`.

    Unreadable items are dropped (B' < B, possibly 0), or with ``refill`` replaced (:func:`refilled`).
    """
    good = [item for item in batch if item[0] is not None]
    bad = [item[2] for item in batch if item[0] is None]
    # before a refill: a copy is no second image read
    sources = [(item[2], *source) for item in good if (source := getattr(item, "source", None)) is not None]
    if not good:
        return LabelledBatch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
    if not isinstance(good[0][0], torch.Tensor):  # a folder built without a transform gives PIL images
        kind = type(good[0][0])
        raise TypeError(f"collate_labelled stacks image tensors, got {kind.__module__}.{kind.__qualname__} "
                        f"({good[0][2]}); give the dataset a transform that ends in one, e.g. "
                        f"torchvision.transforms.v2.Compose([Resize, CenterCrop, ToImage(), "
                        f"ToDtype(torch.float32, scale=True), Normalize(mean, std)])")
    if refill:
        good = refilled(good, len(batch))
    return LabelledBatch(torch.stack([item[0] for item in good]),
                         torch.tensor([item[1] for item in good], dtype=torch.long), bad, sources)


collate_labelled_refill = partial(collate_labelled, refill=True)  # a partial pickles for loader workers


def collate_pretrain(batch: list[dict], listed: tuple[str, ...] = ()) -> dict:
    """Stack the readable items; report the unreadable ones' paths under ``"bad"``.

    -> {"images": (B', 3, S, S), "bad": [paths], "why": {bad path: reason}, "paths": [paths], **other stacked
    fields}; B' may be 0.
    ``listed``: the fields kept as lists instead (None where an item has none), for items that may
    hold their file ``"encoded"`` instead of an image (:func:`lomar.data.device_decode.collate_encoded`).
    """
    good = [item for item in batch if item["image"] is not None or item.get("encoded") is not None]
    bad = [item for item in batch if item["image"] is None and item.get("encoded") is None]
    out: dict = {"bad": [item["path"] for item in bad], "paths": [item["path"] for item in good],
                 "why": {item["path"]: item["why"] for item in bad if item.get("why")},
                 **{key: [item.get(key) for item in good] for key in listed}}
    if not good:
        size = batch[0].get("size", 0) if batch else 0
        out["images"] = torch.empty(0, 3, size, size)
        return out
    for key in good[0]:
        if key not in ("path", "size", *listed):
            out["images" if key == "image" else key] = torch.stack([item[key] for item in good])
    return out


class BadDataTracker:
    """Counts unusable files; logs each once; fails the run when too many are bad.

    With ``total`` (the files this process reads per epoch) the rule is exact: stop once the
    distinct bad files exceed ``threshold`` of them, which is certain however the files are
    ordered, and is known by the end of the first epoch at the latest. A running share of the
    batches seen so far would stop runs with 5-8 % bad files by chance (13-54 % of them, by
    simulation). Without ``total``, that running share is the fallback, from ``min_seen`` on.
    """

    def __init__(self, total: int | None = None, min_seen: int = 20, warn: bool = True):
        self.warn = warn  # False: the data warned of each file itself, with the reason
        self.bad: dict[str, None] = {}
        self.seen = 0
        self.failures = 0
        self.total = total
        self.min_seen = min_seen

    @property
    def count(self) -> int:
        return len(self.bad)

    def update(self, bad_paths: list[str], seen: int) -> None:
        """``seen``: items in the batch, bad ones included."""
        self.seen += seen
        self.failures += len(bad_paths)
        for path in bad_paths:
            if path not in self.bad:
                self.bad[path] = None
                if self.warn:
                    log.warning("skipped unreadable image %s", path)

    def check(self, threshold: float = UNREADABLE_LIMIT) -> None:
        if self.total:
            share = f"{self.count} of {self.total} images (over {100 * threshold:.0f}%)"
            failed = self.count > threshold * self.total
        else:
            fraction = self.failures / max(1, self.seen)
            share = f"{self.failures} of {self.seen} images ({100 * fraction:.0f}%)"
            failed = self.seen >= self.min_seen and fraction > threshold
        if failed:
            raise ValueError(f"{share} could not be used, e.g. {next(iter(self.bad))}; fix or remove them")


