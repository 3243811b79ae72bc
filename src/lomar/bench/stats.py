"""How far apart a configuration's timed steps lie: the column beside every ``lomar bench`` median."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["spread", "SPREAD_LEGEND"]

SPREAD_LEGEND = "spread: (slowest - fastest) / median of the timed steps"


def spread(times: Sequence[float]) -> str:
    """``SPREAD_LEGEND``'s figure as a percentage; "-" under two timed steps, where there is none to tell."""
    if len(times) < 2:
        return "-"
    return f"{(max(times) - min(times)) / statistics.median(times):.0%}"
