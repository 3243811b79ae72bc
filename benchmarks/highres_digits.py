"""Evidence at resolution (issue 21, item 6): LoMaR vs MAE vs BEiT at 224 px, equal wall-clock, CPU.

`lomar compose-digits --classify-images N --classify-size 224` pastes one of scikit-learn's
handwritten digits at a random place and scale on a crop of the bundled photographs: a labelled
10-class ImageFolder at 224 px, a 14x14 patch grid at patch 16 (the paper's grid). A `fig3`-style
`lomar study` then pretrains a small ViT with each method for the same training time per seed
(the cells of one seed take turns in slices, so load from other processes falls on all alike),
and scores every encoder, and a randomly initialised one, by end-to-end finetuning and a linear
probe. Settings below are fixed before running; nothing is tuned on the val split.

    python benchmarks/highres_digits.py                               # 3 seeds x 180 s per method
    python benchmarks/highres_digits.py --budget 10s --seeds 1 --work /tmp/hr --out /tmp  # a look

Resumable: re-run the same command; finished cells and evaluations are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lomar.cli.study.flags import settings_flags
from lomar.cli.study.presets import SMALL, SMALL_DECODER
from lomar.cli.study.runner import run_study
from lomar.cli.study.spec import parse_spec

METHODS = ("lomar", "mae", "beit")
# SMALL (the fig3 preset's ViT: width 128, depth 4, 4 heads) at patch 16 on 224 px. One lr for the
# three methods (BEiT's own, 1.5e-3, is batch-independent; LoMaR's and MAE's blr x batch / 256
# would be 1e-5 at batch 16, too low to move in minutes); every other recipe setting (betas, min
# lr, clipping, crop, colour jitter, layer scale) is each method's own (`--print-config`).
SETTINGS = {**SMALL, "img_size": 224, "patch_size": 16, "lr": 1e-3, "warmup_epochs": 1, "threads": 1}
GRID = {"method": [dict(label="lomar", method="lomar", window_size=7, windows=4),  # the paper's 7x7 x4 at 224
                   dict(label="mae", method="mae", **SMALL_DECODER),
                   dict(label="beit", method="beit")]}
FINETUNE = dict(epochs=5, batch_size=32, blr=5e-3, warmup_epochs=1, layer_decay=0.75, weight_decay=0.05,
                drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1, reprob=0.0, aa="none", workers=1,
                crop_scale=(0.5, 1.0), threads=1)
LINPROBE = dict(epochs=90, workers=1)


def compose(data: Path, images: int) -> Path:
    if not (data / "compose.json").is_file():
        command = [sys.executable, "-m", "lomar", "compose-digits", "--out", str(data), "--img-size", "64",
                   "--images", "8", "--classify-images", str(images), "--classify-size", "224", "--seed", "0"]
        print("$", shlex.join(command), flush=True)
        subprocess.run(command, check=True)
    return data / "classify"


def summarise(records: list[dict]) -> dict:
    """{method: {finetune: [per seed, %], linear_probe: [...], seeds, steps, train_seconds}}."""
    out = {}
    for name in (*METHODS, "random"):
        rows = sorted((r for r in records if (r["random_init"] if name == "random" else
                                              r["labels"].get("method") == name and not r["random_init"])
                       and r["point"] == "end"), key=lambda r: r["seed"])
        out[name] = {"finetune": [round(100 * r["finetune"], 2) for r in rows],
                     "linear_probe": [round(100 * r["linprobe"], 2) for r in rows],
                     "seeds": [r["seed"] for r in rows], "steps": [r["step"] for r in rows],
                     "train_seconds": [round(r["train_seconds"], 1) for r in rows]}
    return out


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {spread:.1f}"


def write_report(out: Path, summary: dict, records: list[dict], meta: dict) -> None:
    (out / "highres-digits.json").write_text(json.dumps({**meta, **summary}, indent=1) + "\n")
    names = {"lomar": "LoMaR (7x7 windows, 4 per image)", "mae": "MAE (global, 75 %)",
             "beit": "BEiT (blockwise, k-means visual tokens)", "random": "random init (LoMaR's ViT, RPE)"}
    loads = [r["load_1min"] for r in records if r.get("load_1min") is not None]
    lines = ["# High-resolution digits: LoMaR vs MAE vs BEiT at 224 px, equal wall-clock (CPU)", "",
             f"Command: `{meta['command']}` ({meta['minutes']:.1f} min in all).", "",
             "| encoder | finetune top-1 (%) | linear probe top-1 (%) | pretraining steps per seed "
             "| training s per seed |", "| --- " * 5 + "|"]
    for method, name in names.items():
        s = summary[method]
        lines.append(f"| {name} | {_fmt(s['finetune'])} | {_fmt(s['linear_probe'])} | "
                     f"{', '.join(map(str, s['steps']))} | {', '.join(f'{x:.0f}' for x in s['train_seconds'])} |")
    lines += [
        "", "Mean ± sample standard deviation over the seeds; `highres-digits.json` holds the per-seed values.", "",
        "## Settings (fixed before running)", "",
        f"- Data: {meta['images']} pictures of 224 px from `lomar compose-digits` (one digit per picture, side "
        "45–80 % of the picture, at a random place on a crop of a bundled scikit-image photograph; train/val "
        "split by digit sample, 75/25). Pretraining on the train split only, unlabelled.",
        f"- Pretraining: `{' '.join(settings_flags(SETTINGS))}`; per method "
        f"`{json.dumps(GRID['method'])}`; budget {meta['budget']} of training time per method and seed.",
        f"- Finetune: `lomar finetune {' '.join(settings_flags(FINETUNE))}` (last epoch's top-1). Linear probe: "
        f"`lomar linprobe` (AdamW on mean-pooled features, {LINPROBE['epochs']} epochs).",
        f"- Machine: {os.cpu_count()} CPU cores shared with other work; 1-minute load average during training "
        f"{min(loads):.1f}–{max(loads):.1f}." if loads else "- Machine: CPU.",
        "", "## Per-cell records", "", "```",
        *[json.dumps({k: r[k] for k in ("setting", "seed", "step", "train_seconds", "load_1min", "train_loss",
                                         "linprobe", "finetune") if k in r}) for r in records], "```", ""]
    (out / "highres-digits.md").write_text("\n".join(lines))


def main() -> None:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="180s", help="pretraining time per method and seed: 120s, 300steps, ...")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--images", type=int, default=800, help="labelled 224 px pictures, both splits")
    parser.add_argument("--work", default="runs/highres-digits", help="the study folder and the composed data")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder for highres-digits.md/.json")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = compose(work / "data", args.images)
    command = "python benchmarks/highres_digits.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for count in range(1, args.seeds + 1):  # seed by seed: a report after each, finished seeds kept
        raw = dict(name="highres-digits", budget=args.budget, seeds=count, slice="30s", settings=SETTINGS,
                   grid=GRID, random_init=True,
                   data={"pretrain": str(root / "train"), "train": str(root / "train"), "val": str(root / "val")},
                   eval={"metrics": ["linprobe", "finetune"], "img_size": 224, "linprobe": LINPROBE,
                         "finetune": FINETUNE})
        records = run_study(parse_spec(raw, "highres_digits.py"), work / "study", command=command)
        meta = {"command": command, "img_size": 224, "images": args.images, "budget": args.budget,
                "minutes": round((time.perf_counter() - start) / 60, 1)}
        write_report(out, summarise(records), records, meta)
    print((out / "highres-digits.md").read_text())


if __name__ == "__main__":
    main()
