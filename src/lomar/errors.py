"""The exceptions the command line turns into one-line messages (exit code 2).

The library raises these; ``lomar.cli`` catches them at its one error boundary. They carry a
message that names the offending value and the fix, and never a traceback for the user.
"""

from __future__ import annotations

__all__ = ["LomarError", "UsageError"]


class LomarError(Exception):
    """Base of every error lomar reports to a user in one line."""


class UsageError(LomarError, ValueError):
    """A bad flag, configuration or input path, found before (or instead of) the work."""
