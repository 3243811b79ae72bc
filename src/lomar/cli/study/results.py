"""A study's result files: results.json (one record per cell x evaluation point), results.md (paper-like tables,
mean ± sd over seeds) and the figures drawn by :mod:`lomar.viz.study`."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from lomar.checkpoints.io import atomic_write_text
from lomar.cli.common import write_json
from lomar.cli.study.spec import StudySpec
from lomar.viz.reconstruction import save_figure
from lomar.viz.study import draw_ablation, draw_time_to_accuracy, group, plotted_metrics

__all__ = ["mean_sd", "table", "write_figures", "write_results", "past_budget"]

# A seconds budget's cell that trained this much longer is named under results.md's tables: its row is not at equal
# time. A slice's time limit stops it at a step's end only: a step the machine slowed, or steps long against the budget.
PAST_BUDGET = 1.25


def mean_sd(values: list[float], percent: bool) -> str:
    """'89.4 ± 0.8' (sample sd over seeds); '89.4' for one seed, which has no spread."""
    scale, digits = (100, 1) if percent else (1, 3)
    spread = f" ± {scale * statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{scale * statistics.fmean(values):.{digits}f}{spread}"


def table(records: list[dict], point: str) -> list[str]:
    """Markdown rows: one per setting, metric columns as mean ± sd over seeds."""
    chosen = [r for r in records if r["point"] == point]
    if not chosen:
        return []
    cols = plotted_metrics(chosen)
    lines = ["| setting | " + " | ".join(t for _, t, _ in cols) + " | steps | train s | seeds |",
             "| --- " * (len(cols) + 4) + "|"]
    for setting, rows in group(chosen, "setting").items():
        values = [([r[key] for r in rows if r.get(key) is not None], percent) for key, _, percent in cols]
        cells = [mean_sd(v, percent) if v else "–" for v, percent in values]
        steps = ", ".join(str(r["step"]) for r in rows)
        seconds = statistics.fmean(r["train_seconds"] for r in rows)
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {steps} | {seconds:.0f} | {len(rows)} |")
    return lines


def write_figures(records: list[dict[str, Any]], spec: StudySpec, out: Path) -> list[Path]:
    """PNG files written into ``out``: time_to_accuracy.png and ablation.png."""
    if not plotted_metrics(records):
        return []
    spread = "mean ± sd over seeds" if len(spec.seeds) > 1 else "one seed"
    return [save_figure(draw_time_to_accuracy(records, f"{spec.name}: against pretraining time ({spread})"),
                        out / "time_to_accuracy.png", dpi=110),
            save_figure(draw_ablation(records, f"{spec.name}: end of a {spec.budget} budget ({spread})"),
                        out / "ablation.png", dpi=110)]


def write_results(records: list[dict[str, Any]], spec: StudySpec, out: Path, minutes: float,
                  command: str | None = None) -> list[Path]:
    """results.json, results.md and the figures it shows; the figures' paths."""
    figures = write_figures(records, spec, out)
    write_json(out / "results.json", {"study": spec.name, "budget": str(spec.budget), "seeds": spec.seeds,
                                      "records": records})
    loads = [r["load_1min"] for r in records if r.get("load_1min") is not None]
    lines = [f"# Study `{spec.name}`", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Budget per cell: {spec.budget} of training (the cell's own step times, start-up and evaluation "
              f"excluded); cells of a seed trained in alternating {spec.slice_s:g} s slices. Seeds: "
              f"{', '.join(map(str, spec.seeds))}. Mean ± sample sd over seeds. This run of the study: "
              f"{minutes:.1f} min" + (f"; 1-minute load average during training {min(loads):.1f}–{max(loads):.1f} "
                                      f"on {os.cpu_count()} cores" if loads else "") + ".", ""]
    lines += ["## At the end of the budget", "", *table(records, "end"), *past_budget(records, spec), ""]
    equal = [r for r in records if r["point"] == "equal_steps"]
    if equal:
        steps = sorted({r["step"] for r in equal if not r["random_init"]})
        lines += [f"## At equal pretraining steps ({', '.join(map(str, steps))}: the slowest cell's count)", "",
                  *table(records, "equal_steps"), ""]
    along = sorted({r["point"] for r in records if r["point"].startswith("at-")},
                   key=lambda p: float(p[3:].removesuffix("steps").removesuffix("s")))
    for point in along:
        lines += [f"## Along the way: {point[3:]}", "", *table(records, point), ""]
    lines += ["## Settings", "", f"- Shared `lomar pretrain` settings: `{json.dumps(spec.settings)}`"]
    for axis, values in spec.grid.items():
        lines.append(f"- Grid axis `{axis}`: " + "; ".join(f"{label} = `{json.dumps(v)}`" for label, v in values))
    if spec.random_init:
        lines.append("- random init: LoMaR's encoder (RPE) at its initialisation (one step at lr 0).")
    ev = spec.eval
    # the settings of the evaluations that ran alone: another's {} would read as if it had run at its defaults
    settings = [f"{name} `{json.dumps(getattr(ev, name))}`" for name in ("knn", "linprobe", "finetune")
                if name in ev.metrics]
    line = f"- Evaluations: {', '.join(ev.metrics) or 'none'}"
    if settings:
        last = "; finetune reports its last epoch's top-1, not the best" if "finetune" in ev.metrics else ""
        line += f"; {', '.join(settings)} (fixed before running{last})"
    lines.append(line + ".")
    if any("heldout_loss" in r and r["heldout_loss"] is None for r in records):
        lines.append("- held-out reconstruction loss: – for BEiT, which predicts visual tokens, not pixels.")
    lines += [f"- {note}" for note in spec.notes]
    if figures:
        lines += ["", "## Figures", "", *[f"![{f.stem}]({f.name})" for f in figures]]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    return figures


def past_budget(records: list[dict[str, Any]], spec: StudySpec) -> list[str]:
    """Lines naming each cell whose training ran well past a seconds budget (none for steps or epochs)."""
    if spec.budget.unit != "seconds":
        return []
    over = [r for r in records if r["point"] == "end" and r["train_seconds"] > PAST_BUDGET * spec.budget.value]
    return ["", *[f"Past the budget: {r['setting']}, seed {r['seed']}, trained {r['train_seconds']:g} s of its "
                  f"{spec.budget} (a slice stops only between steps: the machine slowed during one, or its steps are "
                  f"long against the budget): not at equal time; re-run it on a quieter machine (delete its cell "
                  f"folder), or give the study a longer budget, for a fair row." for r in over]] if over else []
