"""A real-data check that pretraining helps: scikit-learn's handwritten digits, on CPU.

The `lomar study --preset digits` study, one seed after another, summarised for the repository:
1,797 real 8x8 scans of digits (10 classes, shipped inside scikit-learn) written as a 32x32
ImageFolder (stratified 75/25 split), a tiny ViT (patch 4 -> 8x8 grid) pretrained with LoMaR and
with MAE for the same training time, then scored by k-NN, a linear probe and end-to-end
finetuning (one short recipe, fixed a priori, the same for every encoder) against a randomly
initialised encoder, at equal wall-clock *and* at equal pretraining steps, plus each method's
masked-reconstruction loss on the held-out images. Every setting lives in
``lomar.cli.study.presets`` (DIGITS, DIGITS_GRID, DIGITS_EVAL); nothing is tuned on the val split.

    python benchmarks/digits.py                          # 3 seeds x 60 s per method
    python benchmarks/digits.py --budget 20s --seeds 1 --out /tmp/digits   # a quick look
    python benchmarks/digits.py --budget 300steps        # a step budget instead of time

Resumable: re-run the same command and finished cells and evaluations are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from lomar.cli.study.flags import settings_flags
from lomar.cli.study.presets import DIGITS, DIGITS_EVAL, DIGITS_GRID, build_preset
from lomar.cli.study.runner import run_study

METHODS = {"lomar": "method=lomar", "mae": "method=mae", "random": "random init"}
KEYS = {"linear_probe": "linprobe", "knn": "knn", "finetune": "finetune", "heldout_loss": "heldout_loss"}


def summarise(records: list[dict]) -> dict:
    """{method: {linear_probe: [per seed], knn, finetune, heldout_loss, steps, equal_steps: {...}}}."""
    out = {}
    for method, setting in METHODS.items():
        def lists(point: str, setting: str = setting) -> dict:
            rows = sorted((r for r in records if r["setting"] == setting and
                           (r["point"] == point or (r["random_init"] and r["point"] == "end"))),
                          key=lambda r: r["seed"])
            values = {key: [r[src] for r in rows] for key, src in KEYS.items()}
            values.update(seeds=[r["seed"] for r in rows], steps=[r["step"] for r in rows],
                          train_seconds=[r["train_seconds"] for r in rows])
            return values
        out[method] = {**lists("end"), "equal_steps": lists("equal_steps")}
    return out


def _fmt(values: list[float], percent: bool = True) -> str:
    if not values:
        return "–"
    scale, digits = (100, 1) if percent else (1, 3)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * spread:.{digits}f}"


def write_report(out: Path, summary: dict, records: list[dict], command: str, minutes: float) -> None:
    (out / "digits.json").write_text(json.dumps(summary, indent=2) + "\n")
    names = {"lomar": "LoMaR (pretrained)", "mae": "MAE (pretrained)", "random": "random init (LoMaR's ViT, RPE)"}
    loads = [r["load_1min"] for r in records if r.get("load_1min") is not None]

    def table(point: str) -> list[str]:
        lines = ["| encoder | finetune top-1 (%) | linear probe top-1 (%) | k-NN top-1 (%) | held-out recon. loss "
                 "| pretraining steps per seed | training s per seed |", "| --- " * 7 + "|"]
        for method, name in names.items():
            s = summary[method] if point == "end" else summary[method]["equal_steps"]
            lines.append(f"| {name} | {_fmt(s['finetune'])} | {_fmt(s['linear_probe'])} | {_fmt(s['knn'])} | "
                         f"{_fmt(s['heldout_loss'], False)} "
                         f"| {', '.join(map(str, s['steps']))} | {', '.join(f'{x:.0f}' for x in s['train_seconds'])} |")
        return lines

    ft = DIGITS_EVAL["finetune"]
    ft_flags = " ".join(settings_flags(ft))
    lines = [
        "# Digits: does pretraining help? (real data, CPU)", "",
        f"Command: `{command}` ({minutes:.1f} min in all; the study folder holds every run, "
        f"`results.md` and the figures).", "",
        "## At equal wall-clock (the same training time per method and seed)", "", *table("end"), "",
        "## At equal pretraining steps (each method at the step count LoMaR or MAE, whichever is slower, "
        "reached in that time)", "", *table("equal_steps"), "",
        "Mean ± sample standard deviation over the seeds; `digits.json` holds the per-seed values "
        "(keys `lomar`, `mae`, `random`; `equal_steps` inside each). Random init has no pretraining: "
        "the same row in both tables.", "",
        "## Settings (fixed before running; nothing tuned on the validation split)", "",
        "- Data: scikit-learn `load_digits` (1,797 real 8x8 scans, 10 classes), bilinear to 28x28, padded to "
        "32x32 (the evaluations' 0.875 centre crop sees the whole digit), grey in 3 channels, ImageNet "
        "normalisation; stratified 75/25 split, `random_state=0`: 1347 train / 450 val. Pretraining on the "
        "train split only, with `lomar pretrain`'s own augmentation (random resized crop + flip).",
        f"- Encoder: ViT patch {DIGITS['patch_size']} (8x8 grid), width {DIGITS['embed_dim']}, depth "
        f"{DIGITS['depth']}, {DIGITS['num_heads']} heads. Pretraining: batch {DIGITS['batch_size']}, lr "
        f"{DIGITS['lr']}, {DIGITS['warmup_epochs']} warm-up epochs (50 steps) then a cosine over "
        f"{DIGITS['epochs']} epochs (constant in practice: a time budget has no known end), AdamW wd 0.05, "
        f"{DIGITS['threads']} thread.",
        f"- LoMaR: `{json.dumps(DIGITS_GRID[0])}` (RPE). MAE: `{json.dumps(DIGITS_GRID[1])}` (sin-cos).",
        "- Equal wall-clock: each method's training time is the sum of its own step times (from its "
        "`metrics.jsonl`); the methods train in alternating 10 s slices so load from other processes falls "
        "on both alike. Equal steps: the faster method is re-run with the same seed to the slower one's "
        "step count.",
        f"- k-NN: `lomar knn` k=20, T=0.07, mean-pooled features. Linear probe: `lomar linprobe` 100 epochs, "
        f"lr 0.01. Finetune: `lomar finetune {ft_flags}` "
        f"(last epoch's top-1, not the best). Held-out loss: the pretraining objective on the 450 val images "
        f"(centre crops, masks fixed per seed).",
        f"- Machine: {os.cpu_count()} CPU cores shared with other work; 1-minute load average during training "
        f"{min(loads):.1f}–{max(loads):.1f} (this run keeps 1 thread busy)." if loads else "- Machine: CPU.",
        "", "## Per-cell records", "", "```",
        *[json.dumps({k: r[k] for k in ("setting", "seed", "point", "step", "train_seconds", "wall_seconds",
                                         "load_1min", "train_loss", "heldout_loss", "knn", "linprobe",
                                         "finetune") if k in r}) for r in records], "```", ""]
    (out / "digits.md").write_text("\n".join(lines))


def main() -> None:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="60s", help="pretraining per method and seed: 60s, 300steps, ...")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", default="runs/digits-study", help="the study folder (runs, results.md, figures)")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder for digits.md / digits.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/digits.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for count in range(1, args.seeds + 1):  # seed by seed: a report after each, finished seeds kept
        spec = build_preset("digits", budget=args.budget, seeds=count, out=args.work)
        records = run_study(spec, args.work, command=command)
        write_report(out, summarise(records), records, command, (time.perf_counter() - start) / 60)
    print((out / "digits.md").read_text())


if __name__ == "__main__":
    main()
