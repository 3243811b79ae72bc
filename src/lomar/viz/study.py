"""A study's figures: each metric against pretraining time per setting (the paper's Fig. 3) and one
horizontal bar chart per metric at the end of the budget.

Input is the study's records (``results.json``'s ``records``: one dict per cell x evaluation point
with ``setting``, ``point``, ``train_seconds`` and the metric keys). Accuracies are drawn in percent,
as ``results.md`` prints them. Each setting keeps one colour in every panel, whether or not it has a
value there (random init has no train loss). Plain :class:`matplotlib.figure.Figure` objects: no
pyplot, no global backend.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["METRICS", "plotted_metrics", "group", "mean_and_sd", "draw_time_to_accuracy", "draw_ablation"]

# (record key, panel and column title, in percent): the figures' panels and results.md's columns
METRICS = [("finetune", "finetune top-1 (%)", True), ("linprobe", "linear probe top-1 (%)", True),
           ("knn", "k-NN top-1 (%)", True), ("heldout_loss", "held-out reconstruction loss", False),
           ("train_loss", "train loss", False)]

# An accuracy axis spans at least this many points, so that seed noise (a few tenths of a point)
# is not stretched over the whole panel; a loss axis spans at least this share of its largest value.
_MIN_PERCENT_SPAN = 10.0
_MIN_LOSS_SPAN = 0.2


def plotted_metrics(records: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """The METRICS rows at least one record has a value for."""
    return [m for m in METRICS if any(r.get(m[0]) is not None for r in records)]


def group(records: list[dict[str, Any]], field: str, key: str | None = None) -> dict[Any, list[dict[str, Any]]]:
    """The records by their ``field`` value, in first-seen order (``key``: those with a value for it)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        if key is None or r.get(key) is not None:
            groups.setdefault(r[field], []).append(r)
    return groups


def mean_and_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample sd; sd 0 for a single value (drawn without an error bar)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _limits(low: float, high: float, percent: bool) -> tuple[float, float]:
    """(low, high) padded, or widened around its centre to the minimum span; kept inside 0–100 for
    an accuracy and above 0 for a loss."""
    span = _MIN_PERCENT_SPAN if percent else _MIN_LOSS_SPAN * max(abs(low), abs(high), 1e-12)
    half = (1.16 * (high - low) if high - low >= span else span) / 2  # a wide range padded by 8 % a side
    low, high = (low + high) / 2 - half, (low + high) / 2 + half
    ceiling = 100.0 if percent else math.inf
    if low < 0:
        low, high = 0.0, high - low
    if high > ceiling:
        low, high = max(0.0, low - (high - ceiling)), ceiling
    return low, high


def _panels(records: list[dict[str, Any]], title: str, width: float, extra: float, height: Callable[[int], float],
            **share):
    """A titled figure with one titled panel per plotted metric (each ``width`` wide, plus ``extra``;
    ``height`` of the number of settings), the metrics, the settings in study order and their
    colours: one per setting, fixed by its position in the study, not by the panel's lines."""
    metrics, settings = plotted_metrics(records), list(group(records, "setting"))
    fig = Figure(figsize=(extra + width * max(1, len(metrics)), height(len(settings))), layout="constrained")
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False, **share)[0]
    for ax, (_, panel, _) in zip(axes, metrics):
        ax.set_title(panel, fontsize=10)
    fig.suptitle(title, fontsize=10)
    return fig, axes, metrics, settings, {s: f"C{i % 10}" for i, s in enumerate(settings)}


def draw_time_to_accuracy(records: list[dict[str, Any]], title: str) -> Figure:
    """One panel per metric: its mean over seeds (error bar: sample sd) against the mean training
    time, at every point along the way and at the end of the budget; one line per setting."""
    fig, axes, metrics, settings, colours = _panels(records, title, 3.6, 1.8, lambda n: 3.6)
    curve = [r for r in records if r["point"] == "end" or r["point"].startswith("at-")]
    for ax, (key, _, percent) in zip(axes, metrics):
        scale = 100.0 if percent else 1.0
        shown = []
        for setting, rows in group(curve, "setting", key).items():
            pts = sorted((statistics.fmean(x["train_seconds"] for x in v), *mean_and_sd([scale * x[key] for x in v]))
                         for v in group(rows, "point").values())
            xs, ys, sds = zip(*pts)
            ax.errorbar(xs, ys, yerr=sds if any(sds) else None, marker="o", capsize=3, color=colours[setting],
                        label=setting)
            shown += [y - s for y, s in zip(ys, sds)] + [y + s for y, s in zip(ys, sds)]
        if shown:
            ax.set_ylim(*_limits(min(shown), max(shown), percent))
        ax.set_xlabel("time in training steps (s)")  # the budget's clock: not wall time, start-up or evaluations
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colours[s], marker="o") for s in settings]
    fig.legend(handles, settings, loc="outside right upper", fontsize=8)
    return fig


def draw_ablation(records: list[dict[str, Any]], title: str) -> Figure:
    """One horizontal bar chart per metric at the end of the budget: the mean over seeds per setting
    (error bar: sample sd); a setting without a value for the metric gets no bar. Accuracy axes run
    0–100 %, so a difference reads against the whole scale."""
    fig, axes, metrics, settings, colours = _panels(records, title, 3.0, 2.2, lambda n: 1.6 + 0.35 * n, sharey=True)
    end = [r for r in records if r["point"] == "end"]
    for ax, (key, _, percent) in zip(axes, metrics):
        for setting, rows in group(end, "setting", key).items():
            mean, sd = mean_and_sd([(100.0 if percent else 1.0) * r[key] for r in rows])
            ax.barh(settings.index(setting), mean, xerr=sd or None, capsize=3, color=colours[setting], alpha=0.85,
                    label=setting)
        ax.set_xlim(0, 100 if percent else None)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(settings)), settings, fontsize=8)
    axes[0].set_ylim(len(settings) - 0.5, -0.5)  # the study's first setting on top
    for ax in axes[1:]:
        ax.tick_params(labelleft=False)
    return fig

