"""The study's figures: accuracy against pretraining time per setting (the paper's Fig. 3) and
one bar chart per ablation (the metrics at the end of the budget, mean ± sd over seeds); drawn by
:mod:`lomar.viz.study`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lomar.cli.study.spec import StudySpec
from lomar.viz.reconstruction import save_figure
from lomar.viz.study import draw_ablation, draw_time_to_accuracy, plotted_metrics

__all__ = ["write_figures"]


def write_figures(records: list[dict[str, Any]], spec: StudySpec, out: Path) -> list[Path]:
    """PNG files written into ``out``: time_to_accuracy.png and ablation.png."""
    if not plotted_metrics(records):
        return []
    spread = "mean ± sd over seeds" if len(spec.seeds) > 1 else "one seed"
    return [save_figure(draw_time_to_accuracy(records, f"{spec.name}: against pretraining time ({spread})"),
                        out / "time_to_accuracy.png", dpi=110),
            save_figure(draw_ablation(records, f"{spec.name}: end of a {spec.budget} budget ({spread})"),
                        out / "ablation.png", dpi=110)]
