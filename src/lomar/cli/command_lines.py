"""While a command runs, the warnings its process prints through Python begin as the command's own lines do
(``lomar knn: warning: ...``): the records of the ``lomar.*`` loggers (what listing a dataset leaves out, an
unreadable image skipped, an export waiting for another) and Python warnings (``warnings.warn``), lomar's or a
library's (torch, timm). In a log holding several commands' output (a shell script's, a torchrun job's) each line
then says which command said it. A loader worker started by fork has both; one started by spawn (macOS) has neither,
and what a library logs itself (its own loggers, torch's C++ ``[W ...]`` lines) keeps the library's form.

A library's warning keeps its category and the file and line that raised it, at the end of its one line; a
filter (``-W``, ``PYTHONWARNINGS``, a caller's ``warnings.catch_warnings``) decides as always whether it is
shown. Imports no torch: ``lomar --help`` imports this module.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable

from lomar.errors import one_line

__all__ = ["prefix_warnings", "CommandLines"]


# On a terminal a live progress bar (tqdm's) leaves the cursor at the end of its line until it redraws: a warning
# written there would follow the bar on its line. Each warning first wipes that line (carriage return, then ANSI's
# erase to the line's end), so it begins with its prefix and the bar redraws below it, as tqdm.write does in the
# bar's own process; a loader worker's warning has no bar to ask. Off a terminal the bar writes whole lines
# (lomar.progress_bar) and a warning begins as it is.
_WIPE_LINE = "\r\x1b[K"


def _line_start(stream) -> str:
    """What a warning line on ``stream`` begins with: :data:`_WIPE_LINE` on a terminal, else nothing."""
    try:
        return _WIPE_LINE if stream.isatty() else ""
    except (AttributeError, ValueError):  # a stand-in stream without isatty, or a closed one
        return ""


class CommandLines(logging.Handler):
    """The ``lomar`` logger's records of WARNING and above, as ``PREFIX: warning: MESSAGE`` lines on ``sys.stderr``:
    the stream of the moment, which a study redirects around the runs it silences (as Python's last-resort
    handler, which prints a record where no handler is set, takes it)."""

    def __init__(self, prefix: str):
        super().__init__(logging.WARNING)
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(f"{_line_start(stream)}{self.prefix}: {record.levelname.lower()}: "
                         f"{one_line(self.format(record))}\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: a handler's failure is reported, not raised
            self.handleError(record)


def prefix_warnings(prefix: str) -> Callable[[], None]:
    """Print the ``lomar`` loggers' records and Python's warnings as lines of the command ``prefix`` ('lomar knn')
    until the returned function is called, which puts back what was there."""
    handler = CommandLines(prefix)
    logger = logging.getLogger("lomar")
    logger.addHandler(handler)
    previous = warnings.formatwarning

    # formatwarning, not showwarning: a caller recording warnings (catch_warnings(record=True), pytest) still gets them
    def formatwarning(message, category, filename, lineno, line=None) -> str:
        return (f"{_line_start(sys.stderr)}{prefix}: warning: {one_line(str(message))} ({category.__name__}, "
                f"{filename}:{lineno})\n")

    warnings.formatwarning = formatwarning

    def give_back() -> None:
        logger.removeHandler(handler)
        if warnings.formatwarning is formatwarning:  # else a caller set its own meanwhile: theirs stays
            warnings.formatwarning = previous

    return give_back
