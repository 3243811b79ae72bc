"""The study's figures: accuracy against pretraining time per setting (the paper's Fig. 3) and
one bar chart per ablation (the metrics at the end of the budget, mean ± sd over seeds)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lomar.cli.study.spec import StudySpec

__all__ = ["write_figures"]

_METRICS = [("finetune", "finetune top-1"), ("linprobe", "linear probe top-1"), ("knn", "k-NN top-1"),
            ("heldout_loss", "held-out reconstruction loss"), ("train_loss", "train loss")]


def write_figures(records: list[dict[str, Any]], spec: StudySpec, out: Path) -> list[Path]:
    """PNG files written into ``out``: time_to_accuracy.png and ablation.png."""
    import matplotlib

    matplotlib.use("Agg")  # files only; set here, not at import
    import matplotlib.pyplot as plt

    metrics = [(k, t) for k, t in _METRICS if any(r.get(k) is not None for r in records)]
    if not metrics:
        return []
    written = []
    settings = []
    for r in records:
        if r["setting"] not in settings:
            settings.append(r["setting"])
    curve = [r for r in records if r["point"] == "end" or r["point"].startswith("at-")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics):
        for setting in settings:
            rows = [r for r in curve if r["setting"] == setting and r.get(key) is not None]
            by_point: dict[str, list[dict]] = {}
            for r in rows:
                by_point.setdefault(r["point"], []).append(r)
            pts = sorted((statistics.fmean(x["train_seconds"] for x in v), statistics.fmean(x[key] for x in v))
                         for v in by_point.values())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=setting)
        ax.set_xlabel("pretraining time (s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{spec.name}: vs pretraining time\n(mean over seeds)", fontsize=9)
    fig.tight_layout()
    written.append(out / "time_to_accuracy.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics):
        means, sds = [], []
        for setting in settings:
            values = [r[key] for r in records if r["point"] == "end" and r["setting"] == setting
                      and r.get(key) is not None]
            means.append(statistics.fmean(values) if values else 0.0)
            sds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.bar(range(len(settings)), means, yerr=sds, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
    fig.suptitle(f"{spec.name}: end of a {spec.budget} budget\n(mean ± sd over seeds)", fontsize=9)
    fig.tight_layout()
    written.append(out / "ablation.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
