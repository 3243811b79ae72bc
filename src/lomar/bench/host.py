"""What the bench reads of its host beyond torch, on any OS: None where this one does not tell.

The load average and the process's memory come from calls Linux and macOS have and Windows lacks
(``os.getloadavg``, the ``resource`` module), and whose units differ between them (``ru_maxrss``).
"""

from __future__ import annotations

import os
import sys

try:
    import resource
except ImportError:  # Windows
    resource = None

__all__ = ["load_average", "peak_rss_bytes"]


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages; None on Windows (no ``os.getloadavg``) or where the OS cannot say."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def peak_rss_bytes() -> int | None:
    """This process's resident set high-water mark in bytes; None without the ``resource`` module (Windows)."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux and the BSDs KiB
