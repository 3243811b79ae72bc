"""The exceptions the command line turns into one-line messages (exit code 2).

The library raises these; ``lomar.cli`` catches them at its one error boundary. They carry a
message that names the offending value and the fix, and never a traceback for the user.
"""

from __future__ import annotations

import re

__all__ = ["LomarError", "UsageError", "ANSI_ESCAPE"]

# A terminal colour code, as torch's and other libraries' messages carry: dropped from a message that is read
# (lomar.checkpoints.io) or shown on one line (lomar.cli.app).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class LomarError(Exception):
    """Base of every error lomar reports to a user in one line."""


class UsageError(LomarError, ValueError):
    """A bad flag, configuration or input path, found before (or instead of) the work."""
