"""The study's figures: each metric against pretraining time per setting (the paper's Fig. 3) and
one bar chart per ablation (the metrics at the end of the budget, mean ± sd over seeds)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lomar.cli.study.results import COLUMNS, settings_order
from lomar.cli.study.spec import StudySpec

__all__ = ["write_figures"]


def write_figures(records: list[dict[str, Any]], spec: StudySpec, out: Path) -> list[Path]:
    """PNG files written into ``out``: time_to_accuracy.png and ablation.png (accuracies in %, as in results.md)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; set here, not at import
    import matplotlib.pyplot as plt

    metrics = [(k, t, 100 if pct else 1) for k, t, pct in COLUMNS if any(r.get(k) is not None for r in records)]
    settings = settings_order(records)

    def figure(name: str, title: str, draw) -> Path:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.5), squeeze=False)
        for ax, (key, label, scale) in zip(axes[0], metrics):
            draw(ax, key, scale)
            ax.set_title(label)
        fig.suptitle(f"{spec.name}: {title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return out / name

    def curves(ax, key: str, scale: float) -> None:
        for setting in settings:
            by_point: dict[str, list[dict]] = {}
            for r in records:
                if r["setting"] == setting and r.get(key) is not None and r["point"] != "equal_steps":
                    by_point.setdefault(r["point"], []).append(r)
            pts = sorted((statistics.fmean(x["train_seconds"] for x in v), scale * statistics.fmean(x[key] for x in v))
                         for v in by_point.values())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=setting)
        ax.set_xlabel("pretraining time (s)")
        ax.grid(alpha=0.3)
        if key == metrics[0][0]:
            ax.legend(fontsize=7)

    def bars(ax, key: str, scale: float) -> None:
        values = [[scale * r[key] for r in records if r["point"] == "end" and r["setting"] == setting
                   and r.get(key) is not None] for setting in settings]
        ax.bar(range(len(settings)), [statistics.fmean(v) if v else 0.0 for v in values], capsize=3,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values], color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right", fontsize=7)

    if not metrics:
        return []
    return [figure("time_to_accuracy.png", "vs pretraining time\n(mean over seeds)", curves),
            figure("ablation.png", f"end of a {spec.budget} budget\n(mean ± sd over seeds)", bars)]
