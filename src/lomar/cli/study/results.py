"""results.json (one record per cell x evaluation point) and results.md (paper-like tables)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from lomar.checkpoints.io import atomic_write_text
from lomar.cli.common import write_json
from lomar.cli.study.spec import StudySpec

__all__ = ["write_results", "mean_sd", "table", "settings_order", "COLUMNS"]

# (record key, column title, shown as a percentage)
COLUMNS = [("finetune", "finetune top-1 (%)", True), ("linprobe", "linear probe top-1 (%)", True),
           ("knn", "k-NN top-1 (%)", True), ("heldout_loss", "held-out recon. loss", False),
           ("train_loss", "train loss", False)]


def mean_sd(values: list[float], percent: bool) -> str:
    """'89.4 ± 0.8' (sample sd over seeds); '89.4' for one seed, which has no spread."""
    scale, digits = (100, 1) if percent else (1, 3)
    spread = f" ± {scale * statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{scale * statistics.fmean(values):.{digits}f}{spread}"


def settings_order(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["setting"] for r in records))


def table(records: list[dict], point: str) -> list[str]:
    """Markdown rows: one per setting, metric columns as mean ± sd over seeds."""
    chosen = [r for r in records if r["point"] == point]
    if not chosen:
        return []
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in chosen)]
    lines = ["| setting | " + " | ".join(t for _, t, _ in cols) + " | steps | train s | seeds |",
             "| --- " * (len(cols) + 4) + "|"]
    for setting in settings_order(chosen):
        rows = [r for r in chosen if r["setting"] == setting]
        values = [([r[key] for r in rows if r.get(key) is not None], percent) for key, _, percent in cols]
        cells = [mean_sd(v, percent) if v else "–" for v, percent in values]
        steps = ", ".join(str(r["step"]) for r in rows)
        seconds = statistics.fmean(r["train_seconds"] for r in rows)
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {steps} | {seconds:.0f} | {len(rows)} |")
    return lines


def write_results(records: list[dict[str, Any]], spec: StudySpec, out: Path, figures: list[Path],
                  minutes: float, command: str | None = None) -> None:
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
    lines += ["## At the end of the budget", "", *table(records, "end"), ""]
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
    lines.append(f"- Evaluations: {', '.join(ev.metrics) or 'none'}; knn `{json.dumps(ev.knn)}`, linprobe "
                 f"`{json.dumps(ev.linprobe)}`, finetune `{json.dumps(ev.finetune)}` (fixed before running; "
                 f"finetune reports its last epoch's top-1, not the best).")
    lines += [f"- {note}" for note in spec.notes]
    if figures:
        lines += ["", "## Figures", "", *[f"![{f.stem}]({f.name})" for f in figures]]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
