"""The error of an image file the data layer cannot read or decode, with the file and the reason apart.

Its message is the one a user reads ("cannot decode image PATH: REASON"); a caller that names the file itself (a
run's list of skipped images: "PATH (REASON)") quotes :attr:`ImageFileError.reason` alone.
"""

from __future__ import annotations

__all__ = ["DECODE", "READ", "ImageFileError", "reason"]

DECODE = "cannot decode image"  # the file was read: its bytes are no image lomar decodes
READ = "cannot read"  # the file was not read: not a regular file, over the byte limit, an OS error


class ImageFileError(ValueError):
    """``path`` (the file's name as the caller gave it) and ``reason`` (why, without the name); the message is
    ``"{lead} {path}: {reason}"``, ``lead`` :data:`DECODE` or :data:`READ`. A ValueError, as every reader catches.

    Given one argument, it is the whole message, ``path`` None and ``reason`` the message: torch's DataLoader rebuilds
    a worker's error so, from its type and text, and a type it cannot rebuild reaches the loop a RuntimeError."""

    def __init__(self, path: object, reason: str | None = None, lead: str = DECODE):
        whole = reason is None
        super().__init__(str(path) if whole else f"{lead} {path}: {reason}")
        self.path: str | None = None if whole else str(path)
        self.reason: str = str(self) if whole else reason
        self.lead = lead

    def __reduce__(self):  # rebuilt from its parts, not from the message, where it is pickled
        return type(self), (self.reason,) if self.path is None else (self.path, self.reason, self.lead)


def reason(exc: BaseException) -> str:
    """Why ``exc`` says an image file cannot be used, for a caller that names the file itself: an
    :class:`ImageFileError`'s reason, any other exception's message (Pillow's and torch's name no file)."""
    return exc.reason if isinstance(exc, ImageFileError) else str(exc)
