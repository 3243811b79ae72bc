"""A progress bar on stderr (:func:`progress`), for a training run and an evaluation's feature extraction alike: live on
a terminal, one whole line now and then in a log file. Imports no torch (tqdm when a bar is made)."""

from __future__ import annotations

import sys

__all__ = ["progress", "QUIET_INTERVAL"]

QUIET_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal (a log file)


class _Lines:
    """tqdm's output as whole lines: off a terminal its ``\\r`` redraws would pile up on one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, total: int | None = None, desc: str = "", initial: int = 0, unit: str = "it"):
    """A tqdm bar on stderr: live on a terminal; elsewhere one line every ``QUIET_INTERVAL`` seconds,
    the first after that long (a run shorter than that prints none)."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True)
    # no ncols: a width would cut a log's line, and its last figures (a run's lr) with it
    return tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit, file=_Lines(sys.stderr),
                mininterval=QUIET_INTERVAL, maxinterval=QUIET_INTERVAL * 4, delay=QUIET_INTERVAL, leave=False)
