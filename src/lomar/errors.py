"""The exceptions the command line turns into one-line messages (exit code 2).

The library raises these; ``lomar.cli`` catches them at its one error boundary. They carry a
message that names the offending value and the fix, and never a traceback for the user.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Iterator

__all__ = ["LomarError", "UsageError", "ANSI_ESCAPE", "FULL_DISK", "UNWRITABLE", "full_disk_words", "first_on_machine",
           "said_by_first_on_machine", "leave_it_to_the_first_process", "FIRST_PROCESS_WAIT", "in_flags",
           "exception_line", "one_line"]

# A terminal colour code, as torch's and other libraries' messages carry: dropped from a message that is read
# (lomar.checkpoints.io) or shown on one line (one_line).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The errnos of a write that failed for its place, not its data: a full disk (or quota), and a folder that cannot be
# written (read-only, not permitted). Saves (single-process and sharded) and the CLI's messages read the same groups.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def one_line(message: str) -> str:
    """A message as one line of a command's stderr (its error, a warning): its lines joined by a space, blank ones
    dropped, without terminal colour codes."""
    return " ".join(part.strip() for part in ANSI_ESCAPE.sub("", message).splitlines() if part.strip())


def exception_line(exc: BaseException) -> str:
    """An exception's message in one line, as a skip warning or a refusal quotes it: its first line, or its type's
    name where it has no message (Pillow's EOFError(), a SyntaxError without text)."""
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


def full_disk_words(code: int | None) -> str:
    """What a write that failed with ``code`` (one of FULL_DISK) met: a quota leaves the device's free space that
    ``df`` shows, so "no space left on the device" would send its user looking for a full disk that is not."""
    return "no space left in the disk quota" if code == errno.EDQUOT else "no space left on the device"


_PATH_WORD = re.compile(r"(\S*[/\\]\S*)")  # in_flags: a message's word that is (or holds) a path


def first_on_machine() -> bool:
    """Whether this process prints a run's errors and notes: the only one without torchrun, else the first of its
    machine (``LOCAL_RANK`` 0). A single process (``WORLD_SIZE`` unset or 1) is the first whatever ``LOCAL_RANK`` a
    job's environment left set, as :func:`lomar.train.distributed.init_distributed` takes it."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("LOCAL_RANK", "0")) == 0


@contextlib.contextmanager
def said_by_first_on_machine(logger: str = "lomar.data", say: bool | None = None) -> Iterator[None]:
    """A block whose ``logger`` records every torchrun process of a machine would make alike (what listing a
    dataset finds: files left out, hidden folders, links, empty classes), said by the first of each machine alone
    (``say`` None: :func:`first_on_machine`), not once per process. Where not said, a filter of the logger's own drops
    them until the block ends, by an exception too; the logger's level and handlers stay as they are. What one
    process alone meets (an unreadable image of its share) belongs outside such a block."""
    if first_on_machine() if say is None else say:
        yield
        return
    drop = logging.Filter("-")  # passes no record: no logger has that name
    quiet = logging.getLogger(logger)
    quiet.addFilter(drop)
    try:
        yield
    finally:
        quiet.removeFilter(drop)


FIRST_PROCESS_WAIT = 30.0  # seconds a torchrun process waits for the first one to report a bad setting or input


def leave_it_to_the_first_process() -> None:
    """Under torchrun every process of a machine meets the same bad flag, file or folder, and each printed the same
    line: the first one says it (one per machine: another machine's files may differ). The others wait for it to fail
    and torchrun to stop them (silently: lomar.cli.app); ending first, one would have torchrun stop the first before
    it said why. One still running after the wait (its error was its own) says it itself."""
    if not first_on_machine():
        time.sleep(FIRST_PROCESS_WAIT)

def in_flags(message: str, flags: dict[str, str]) -> str:
    """A library message, which names the Python parameters it was given, in the words of the command line that
    passed them: ``flags`` maps a parameter to its flag. ``name=value`` (a value quoted or not) reads ``--flag
    value``, a tuple or list of numbers (``name=(3,)``, ``name=[2, 5]``) ``--flag 3``, ``--flag 2 5``; a bare name
    reads ``--flag`` where it has an underscore, which no word of the prose has (``pass window_size <= 7``), and is
    left as it is without one (``patch``, ``windows``), which prose may hold. A Python alternative for a name the
    command has no flag for (``pass num_heads=... to load_original, or ...``) is dropped, its other fix kept. A word
    holding ``/`` or ``\\`` is a path and stays whole."""
    if not flags:
        return message
    names = "|".join(map(re.escape, sorted(flags, key=len, reverse=True)))
    bare = "|".join(map(re.escape, sorted((name for name in flags if "_" in name), key=len, reverse=True)))

    def reworded(text: str) -> str:
        text = re.sub(r"\bpass (\w+)=\.\.\. to [\w.]+, or ", lambda m: m[0] if m[1] in flags else "", text)
        text = re.sub(rf"(?<![\w.-])({names})=[\[(]([\d.,\s]*)[\])]",
                      lambda m: " ".join([flags[m[1]], *re.findall(r"[\d.]+", m[2])]), text)
        text = re.sub(rf"(?<![\w.-])({names})=(['\"]?)([^\s,;'\"]*)\2", lambda m: f"{flags[m[1]]} {m[3]}", text)
        return re.sub(rf"(?<![\w.-])({bare})\b", lambda m: flags[m[1]], text) if bare else text

    # A word holding a path separator is a file's path, whose folders may be named so (a sweep's runs/window_size=5/)
    parts = _PATH_WORD.split(message)
    return "".join(part if i % 2 else reworded(part) for i, part in enumerate(parts))


class LomarError(Exception):
    """Base of every error lomar reports to a user in one line."""


class UsageError(LomarError, ValueError):
    """A bad flag, configuration or input path, found before (or instead of) the work."""
