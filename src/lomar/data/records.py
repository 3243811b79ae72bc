"""Per-item records (a COCO image's file, size and annotations) pickled into one byte buffer and an offset array.

The reason is :mod:`lomar.data.pathtable`'s: loader workers are forked from the process that read the data, and a
worker that reads a Python object writes its reference count (and a garbage collection writes every container's
header), so each worker comes to copy the pages of every record it reads. COCO's annotations are millions of objects
(each polygon a list of floats): a worker reading the targets of 30k synthetic COCO images (208k objects) grew to
505 MiB private memory over one pass, which is about 2 GiB per worker on train2017 (118k images), times the workers
and the processes. A record here is unpickled anew at each read, and the buffer it comes from is never written, so
the workers' pages stay the parent's (detectron2's ``DatasetFromList(serialize=True)`` does the same).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["PackedRecords", "IntTable", "pack_images"]


class PackedRecords(Sequence):
    """An immutable sequence of picklable records; ``records[i]`` is a fresh copy of the i-th (equal to it, as
    pickling keeps floats, ints, strings, lists and dicts exactly)."""

    def __init__(self, records: Iterable[Any] = ()):
        # written as they come, not joined from a list: the building process holds the buffer once (train2017's
        # is about 0.4 GiB), beside whatever the records are made from
        buffer, ends = io.BytesIO(), [0]
        for record in records:
            buffer.write(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
            ends.append(buffer.tell())
        self._offsets = np.array(ends, dtype=np.int64)
        self._buffer = np.frombuffer(buffer.getvalue(), dtype=np.uint8)  # the bytes BytesIO holds, not a copy

    @classmethod
    def from_arrays(cls, offsets: np.ndarray, buffer: np.ndarray) -> PackedRecords:
        """Records from what :meth:`arrays` gave (a memory-mapped file's views: :mod:`lomar.data.coco_shared`)."""
        packed = cls.__new__(cls)
        packed._offsets, packed._buffer = offsets, buffer
        return packed

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, record bytes): record i is ``bytes[offsets[i]:offsets[i + 1]]``."""
        return self._offsets, self._buffer

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PackedRecords(self[i] for i in range(*index.indices(len(self))))
        size, i = len(self), int(index)
        i = i + size if i < 0 else i
        if not 0 <= i < size:
            raise IndexError(f"record index {index} out of range for {size} records")
        return pickle.loads(memoryview(self._buffer[self._offsets[i]:self._offsets[i + 1]]))

    def __repr__(self) -> str:
        return f"PackedRecords({len(self)} records, {self._buffer.nbytes} bytes)"


class IntTable(Sequence):
    """Integers (ids) in one numpy array; ``table[i]`` is a Python ``int``, as a list of them would give. Ids beyond
    64 bits (JSON has no limit) are kept as Python ints, as few as a dataset has images."""

    def __init__(self, values: Iterable[int] = ()):
        values = list(values)
        try:
            self._values = np.array(values, dtype=np.int64)
        except OverflowError:
            self._values = np.array(values, dtype=object)

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return IntTable(self._values[index].tolist())
        return int(self._values[index])

    def __repr__(self) -> str:
        return f"IntTable({len(self)} values)"


def pack_images(data: dict, categories: list[int]) -> tuple[PackedRecords, IntTable]:
    """A COCO dict's images as records (file name, width, height, its annotations in file order with category ids
    made labels 1..K in ``categories``' order) and their ids."""
    label_of = {cat: i + 1 for i, cat in enumerate(categories)}
    by_image = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        by_image.get(ann["image_id"], []).append(ann)
    records = PackedRecords((image["file_name"], image["width"], image["height"],
                             [{**a, "category_id": label_of[a["category_id"]]} for a in by_image[image["id"]]])
                            for image in data["images"])
    return records, IntTable(image["id"] for image in data["images"])
