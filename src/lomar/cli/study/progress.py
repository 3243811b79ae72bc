"""What a cell's run folder says of its training so far, from its ``metrics.jsonl`` (never from what the run
printed): its steps, each step's training seconds (images per step / img_s), its loss, and the pace that plans
the cell's next slice."""

from __future__ import annotations

from pathlib import Path

from lomar.checkpoints.file_names import METRICS
from lomar.train.monitor import read_records

__all__ = ["read_progress", "pace"]


def read_progress(folder: Path, batch: int) -> tuple[int, list[float], float | None]:
    """(steps, each logged step's training seconds, mean loss of the last 10 steps) from a run's metrics.jsonl."""
    records = [r for r in read_records(folder / METRICS) if "loss" in r]
    seconds = [batch / r["img_s"] for r in records if r.get("img_s")]
    tail = [r["loss"] for r in records[-10:]]
    return (records[-1]["step"] if records else 0), seconds, (sum(tail) / len(tail) if tail else None)


def pace(step_seconds: list[float], window: float) -> float | None:
    """Steps a training second over the latest ``window`` seconds of steps (a slice's worth; all of them when
    fewer), None before the first. Another job's load on the machine lasts minutes: the next slice trains as
    slowly as the last did, where the mean over the whole run, its quieter start included, plans it past the
    budget (a machine twice as busy since the second of three 10 s slices: the third 15 s, not 10)."""
    count, seconds = 0, 0.0
    while count < len(step_seconds) and seconds < window:
        count, seconds = count + 1, seconds + step_seconds[-1 - count]
    return count / seconds if seconds else None
