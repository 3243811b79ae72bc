"""Training curves: the loss of a run (``metrics.jsonl``) as a PNG.

Drawn on a plain :class:`matplotlib.figure.Figure` (no pyplot, no global backend) and written
atomically with :func:`lomar.viz.reconstruction.save_figure`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING

from lomar.checkpoints.io import read_log
from lomar.viz.reconstruction import save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["read_losses", "loss_summary", "draw_loss_curve", "running_mean", "loss_curve"]


def read_losses(metrics: str | Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of the training records in a ``metrics.jsonl``; records without a finite ``loss`` (a k-NN or
    epoch record) are skipped, as :func:`lomar.checkpoints.io.read_log` skips lines that are no record (a torn one).

    Read a line at a time: the run's main process reads the whole log at every checkpoint (loss.png), and with the
    file and its lines held at once a figure of a million logged steps took 472 MiB more at its peak, not 262 (a
    single-GPU ImageNet run logs 8 million steps; lomar.train.runtime's malloc settings keep the heap's peak)."""
    steps, losses = [], []
    for _, record in read_log(metrics):
        loss = record.get("loss")
        if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss):
            steps.append(record["step"])
            losses.append(float(loss))
    return steps, losses


def loss_summary(metrics: str | Path, mean_of_last: int = 0) -> str | None:
    """'loss A at step 1 -> B at step N' from a ``metrics.jsonl``, led by 'loss M, the mean of the last
    K logged steps; ' when ``mean_of_last`` is K > 0 (one step's loss is noisy); None without two records."""
    try:
        steps, losses = read_losses(metrics)
    except OSError:
        return None
    if len(steps) < 2:
        return None
    tail = losses[-mean_of_last:] if mean_of_last else []
    mean = f"loss {sum(tail) / len(tail):.4f}, the mean of the last {len(tail)} logged steps; " if tail else ""
    return f"{mean}loss {losses[0]:.4f} at step {steps[0]} -> {losses[-1]:.4f} at step {steps[-1]}"


def draw_loss_curve(steps: list[int], losses: list[float], title: str = "training loss",
                    ylabel: str = "reconstruction loss") -> Figure:
    """Loss against optimizer step: every logged value, faint, and a running mean over ~5 % of the
    run, which shows the trend through the noise of small batches. ``ylabel`` names the loss (BEiT's is a
    cross-entropy over visual tokens, not a reconstruction)."""
    # matplotlib is slow to import: only when a figure is drawn
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
    width = max(1, len(losses) // 20)
    if width > 1:
        ax.plot(steps, running_mean(losses, width), color="tab:blue", linewidth=1.8, label=f"mean of {width}")
        ax.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def running_mean(values: list[float], width: int) -> list[float]:
    """The mean of each value and the ``width`` - 1 before it (fewer at the start), in O(n). The figure is drawn at
    every checkpoint of a run in the main process, and its window grows with the run (5 % of it): summing each
    window anew made a figure O(n²), 8 s at 100,000 logged steps and hours at the millions a single-GPU ImageNet
    run logs. Sums within blocks of ``width``: a window is a block's suffix plus the next one's prefix, so each
    mean adds only its window's values (a running sum over the whole run would carry the rounding of a huge early
    loss into every later mean)."""
    n = len(values)
    prefix, suffix = [0.0] * n, [0.0] * n
    for start in range(0, n, width):
        block = values[start:start + width]
        prefix[start:start + len(block)] = itertools.accumulate(block)
        suffix[start:start + len(block)] = list(itertools.accumulate(reversed(block)))[::-1]
    means = []
    for i in range(n):
        first = max(0, i - width + 1)
        total = prefix[i] if first // width == i // width else suffix[first] + prefix[i]
        means.append(total / (i + 1 - first))
    return means


def loss_curve(metrics: str | Path, path: str | Path, title: str = "training loss",
               ylabel: str = "reconstruction loss") -> Path | None:
    """Write the loss curve of ``metrics`` (a ``metrics.jsonl``) to ``path``; None when it holds no loss yet."""
    steps, losses = read_losses(metrics)
    if not steps:
        return None
    return save_figure(draw_loss_curve(steps, losses, title, ylabel), path, dpi=100)
