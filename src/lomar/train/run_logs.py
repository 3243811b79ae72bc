"""A resumed run's logs (``metrics.jsonl``, ``knn.jsonl``) cut back to its checkpoint's step.

A log is appended to as the run goes, in step order, and every resume cuts it back, so what a resume drops (the
records a run killed after its last checkpoint wrote, a line it tore) is the end of the file. The cut reads the file
backwards from its end to the last record at or before the step and truncates the file there: one ``ftruncate``,
which a crash leaves done or not done, and nothing written when nothing follows the step (a run stopped by a signal
checkpoints the step it logged last). Copying the whole log instead cost a resume about 40 s at a million logged
steps (a single-GPU ImageNet run logs 8 million). Only records without a step (``detect --eval-only`` appends its
scores to the run's log) between dropped lines make the cut a copy: they are kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from lomar.checkpoints.io import atomic_write, log_record, open_in_place, read_log

__all__ = ["truncate_metrics", "evaluation_logged", "evaluation_at", "evaluated_after"]

_BLOCK = 1 << 14  # the bytes read at a time: a resume holds the log a block at a time, not whole


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of the log ``path`` past the record of ``step`` (a crash between the checkpoint and them) and
    the torn ones among them; lines before it are left as they are (every reader skips a line that is no record)."""
    if not path.exists():
        return
    with open_in_place(path, "a+b") as handle:
        cut, stepless, mixed = None, False, False
        for offset, line in _lines_backward(handle):
            record = log_record(line.decode("utf-8", "replace"), stepless=True)
            if record is not None and "step" in record and record["step"] <= step:
                break
            if record is not None and "step" not in record:
                stepless = True  # kept, unless a line to drop comes before it
            elif stepless:
                mixed = True
                break
            else:
                cut = offset
        if not mixed:
            if cut is not None:
                handle.truncate(cut)
            elif not _ends_line(handle):
                handle.write(b"\n")  # a last record whole but for its end: the next one would join its line
            else:
                return
            handle.flush()
            os.fsync(handle.fileno())
            return
    atomic_write(path, lambda out: out.writelines(
        f"{line}\n".encode() for line, record in read_log(path, stepless=True) if record.get("step", 0) <= step))


def evaluation_logged(path: Path, step: int) -> bool:
    """Whether the log ``path`` holds an evaluation's record of ``step`` (one without the ``lr`` of a training step's
    record), read backwards from its end down to the records of earlier steps."""
    return evaluation_at(path, step) is not None


def evaluation_at(path: Path, step: int) -> dict | None:
    """The last evaluation's record of ``step`` in the log ``path`` (one without a training step's ``lr``), read
    backwards from its end down to the records of earlier steps; None when it holds none."""
    for record in _records_backward(path):
        if record["step"] < step:
            return None
        if record["step"] == step and "lr" not in record:
            return record
    return None


def evaluated_after(path: Path, step: int) -> bool:
    """Whether the log ``path`` holds an evaluation's record (one without a training step's ``lr``) of a step past
    ``step``, read backwards from its end down to the records of ``step`` and earlier."""
    for record in _records_backward(path):
        if record["step"] <= step:
            return False
        if "lr" not in record:
            return True
    return False


def _records_backward(path: Path) -> Iterator[dict]:
    """The step records of the log ``path``, the last first (a line that is none passed over); none without a file.
    The file stays open until the caller stops asking."""
    if not path.is_file():
        return
    with open_in_place(path, "rb") as handle:
        for _, line in _lines_backward(handle):
            if (record := log_record(line.decode("utf-8", "replace"))) is not None:
                yield record


def _ends_line(handle: BinaryIO) -> bool:
    """Whether ``handle``'s file is empty or ends with a line end."""
    if handle.seek(0, os.SEEK_END) == 0:
        return True
    handle.seek(-1, os.SEEK_END)
    return handle.read(1) == b"\n"


def _lines_backward(handle: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its end) of each line of ``handle``'s file, the last first, a block at a time."""
    pos = handle.seek(0, os.SEEK_END)
    tail, last = b"", True
    while pos > 0:
        size = min(_BLOCK, pos)
        pos -= size
        handle.seek(pos)
        lines = (handle.read(size) + tail).split(b"\n")
        if last and lines[-1] == b"":  # the file's final line end, not an empty line after it
            lines.pop()
        last, tail = False, lines[0]  # it may go on in the block before
        offset = pos + sum(len(line) + 1 for line in lines)
        for line in reversed(lines[1:]):
            offset -= len(line) + 1
            yield offset, line
    if tail or not last:
        yield 0, tail
