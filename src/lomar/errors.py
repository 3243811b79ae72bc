"""The exceptions the command line turns into one-line messages (exit code 2).

The library raises these; ``lomar.cli`` catches them at its one error boundary. They carry a
message that names the offending value and the fix, and never a traceback for the user.
"""

from __future__ import annotations

import errno
import os
import re

__all__ = ["LomarError", "UsageError", "ANSI_ESCAPE", "FULL_DISK", "UNWRITABLE", "first_on_machine"]

# A terminal colour code, as torch's and other libraries' messages carry: dropped from a message that is read
# (lomar.checkpoints.io) or shown on one line (lomar.cli.app).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The errnos of a write that failed for its place, not its data: a full disk (or quota), and a folder that cannot be
# written (read-only, not permitted). Saves (single-process and sharded) and the CLI's messages read the same groups.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def first_on_machine() -> bool:
    """Whether this process prints a run's errors and notes: the only one without torchrun, else the first of its
    machine (``LOCAL_RANK`` 0). A single process (``WORLD_SIZE`` unset or 1) is the first whatever ``LOCAL_RANK`` a
    job's environment left set, as :func:`lomar.train.distributed.init_distributed` takes it."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("LOCAL_RANK", "0")) == 0


class LomarError(Exception):
    """Base of every error lomar reports to a user in one line."""


class UsageError(LomarError, ValueError):
    """A bad flag, configuration or input path, found before (or instead of) the work."""
