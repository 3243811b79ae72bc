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
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["METRICS", "plotted_metrics", "draw_time_to_accuracy", "draw_ablation"]

# (record key, panel title, drawn in percent)
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


def _settings(records: list[dict[str, Any]]) -> list[str]:
    order: list[str] = []
    for r in records:
        if r["setting"] not in order:
            order.append(r["setting"])
    return order


def _colours(settings: list[str]) -> dict[str, str]:
    """One colour per setting, fixed by its position in the study, not by the panel's lines."""
    return {s: f"C{i % 10}" for i, s in enumerate(settings)}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample sd; sd 0 for a single value (drawn without an error bar)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _limits(low: float, high: float, percent: bool) -> tuple[float, float]:
    """(low, high) padded, or widened around its centre to the minimum span; kept inside 0–100 for
    an accuracy and above 0 for a loss."""
    span = _MIN_PERCENT_SPAN if percent else _MIN_LOSS_SPAN * max(abs(low), abs(high), 1e-12)
    if high - low >= span:
        pad = 0.08 * (high - low)
        low, high = low - pad, high + pad
    else:
        centre = (low + high) / 2
        low, high = centre - span / 2, centre + span / 2
    ceiling = 100.0 if percent else math.inf
    if low < 0:
        low, high = 0.0, high - low
    if high > ceiling:
        low, high = max(0.0, low - (high - ceiling)), ceiling
    return low, high


def draw_time_to_accuracy(records: list[dict[str, Any]], title: str) -> Figure:
    """One panel per metric: its mean over seeds (error bar: sample sd) against the mean training
    time, at every point along the way and at the end of the budget; one line per setting."""
    metrics = plotted_metrics(records)
    settings = _settings(records)
    colours = _colours(settings)
    curve = [r for r in records if r["point"] == "end" or r["point"].startswith("at-")]
    fig = Figure(figsize=(3.6 * max(1, len(metrics)) + 1.8, 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    for ax, (key, panel, percent) in zip(axes, metrics):
        scale = 100.0 if percent else 1.0
        shown = []
        for setting in settings:
            by_point: dict[str, list[dict]] = {}
            for r in curve:
                if r["setting"] == setting and r.get(key) is not None:
                    by_point.setdefault(r["point"], []).append(r)
            pts = sorted((statistics.fmean(x["train_seconds"] for x in v), *_mean_sd([scale * x[key] for x in v]))
                         for v in by_point.values())
            if not pts:
                continue
            xs, ys, sds = zip(*pts)
            ax.errorbar(xs, ys, yerr=sds if any(sds) else None, marker="o", capsize=3, color=colours[setting],
                        label=setting)
            shown += [y - s for y, s in zip(ys, sds)] + [y + s for y, s in zip(ys, sds)]
        if shown:
            ax.set_ylim(*_limits(min(shown), max(shown), percent))
        ax.set_xlabel("pretraining time (s)")
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colours[s], marker="o") for s in settings]
    fig.legend(handles, settings, loc="outside right upper", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def draw_ablation(records: list[dict[str, Any]], title: str) -> Figure:
    """One horizontal bar chart per metric at the end of the budget: the mean over seeds per setting
    (error bar: sample sd); a setting without a value for the metric gets no bar. Accuracy axes run
    0–100 %, so a difference reads against the whole scale."""
    metrics = plotted_metrics(records)
    settings = _settings(records)
    colours = _colours(settings)
    end = [r for r in records if r["point"] == "end"]
    fig = Figure(figsize=(2.2 + 3.0 * max(1, len(metrics)), 1.6 + 0.35 * len(settings)), layout="constrained")
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False, sharey=True)[0]
    for ax, (key, panel, percent) in zip(axes, metrics):
        scale = 100.0 if percent else 1.0
        for i, setting in enumerate(settings):
            values = [scale * r[key] for r in end if r["setting"] == setting and r.get(key) is not None]
            if not values:
                continue
            mean, sd = _mean_sd(values)
            ax.barh(i, mean, xerr=sd or None, capsize=3, color=colours[setting], alpha=0.85, label=setting)
        if percent:
            ax.set_xlim(0, 100)
        else:
            ax.set_xlim(0, None)
        ax.set_title(panel, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(settings)), settings, fontsize=8)
    axes[0].set_ylim(len(settings) - 0.5, -0.5)  # the study's first setting on top
    for ax in axes[1:]:
        ax.tick_params(labelleft=False)
    fig.suptitle(title, fontsize=10)
    return fig

