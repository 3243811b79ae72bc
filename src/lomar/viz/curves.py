"""Training curves: the loss of a run (``metrics.jsonl``) as a PNG.

Drawn on a plain :class:`matplotlib.figure.Figure` (no pyplot, no global backend) and written
atomically with :func:`lomar.viz.reconstruction.save_figure`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from lomar.viz.reconstruction import save_figure

__all__ = ["read_losses", "loss_summary", "draw_loss_curve", "loss_curve"]


def read_losses(metrics: str | Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of the training records in a ``metrics.jsonl``; lines that are not JSON
    objects with a finite ``step`` and ``loss`` (a k-NN or epoch record, a torn last line) are skipped."""
    steps, losses = [], []
    for line in Path(metrics).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        step, loss = record.get("step"), record.get("loss")
        if isinstance(step, int) and isinstance(loss, (int, float)) and not isinstance(loss, bool) \
                and math.isfinite(loss):
            steps.append(step)
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


def draw_loss_curve(steps: list[int], losses: list[float], title: str = "training loss") -> Figure:
    """Loss against optimizer step: every logged value, faint, and a running mean over ~5 % of the
    run, which shows the trend through the noise of small batches."""
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
    width = max(1, len(losses) // 20)
    if width > 1:
        smooth = [sum(losses[max(0, i - width + 1):i + 1]) / len(losses[max(0, i - width + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", linewidth=1.8, label=f"mean of {width}")
        ax.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reconstruction loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def loss_curve(metrics: str | Path, path: str | Path, title: str = "training loss") -> Path | None:
    """Write the loss curve of ``metrics`` (a ``metrics.jsonl``) to ``path``; None when it holds no loss yet."""
    steps, losses = read_losses(metrics)
    if not steps:
        return None
    return save_figure(draw_loss_curve(steps, losses, title), path, dpi=100)
