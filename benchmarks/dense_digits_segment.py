"""Segmentation evidence on the composed digits set (issue 20, item 4, the mIoU part), on CPU.

`lomar compose-digits` writes sklearn's digits pasted on the bundled photographs; each seed then
pretrains a tiny ViT with LoMaR and with MAE for the same number of steps on the training pictures
(no labels), and finetunes UperNet (`lomar segment`, equal steps, the same short recipe for every
encoder) from each of them and from a randomly initialised encoder. The final evaluation's mIoU
(mAcc, aAcc) per encoder and seed goes to ``--json`` with the exact commands.

    python benchmarks/dense_digits_segment.py --work /tmp/dds --seeds 0 1
    python benchmarks/dense_digits_segment.py --work /tmp/dds --seeds 0 --pretrain-steps 20 --steps 10  # a look

Resumable: a run whose metrics are written is not run again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENCODERS = ("lomar", "mae", "random")


def _lomar(*args: str) -> None:
    command = [sys.executable, "-m", "lomar", *args]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def _final(out: Path) -> dict | None:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    evals = [json.loads(x) for x in path.read_text().splitlines() if '"mIoU"' in x]
    return evals[-1] if evals else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("dense-digits-segment.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--model", default="vit_tiny_patch16")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    data = args.work / "data"
    if not (data / "compose.json").is_file():
        _lomar("compose-digits", "--out", str(data), "--img-size", str(args.img_size), "--images", str(args.images),
               "--seed", "0")
    common = ["--model", args.model, "--img-size", str(args.img_size), "--threads", str(args.threads),
              "--workers", "1", "--device", "cpu"]
    pretrain = [*common, "--data", str(data / "images" / "training"), "--batch-size", "16",
                "--max-steps", str(args.pretrain_steps), "--blr", "1.5e-4", "--log-every", "50"]
    segment = [*common, "--data", str(data), "--num-classes", "10", "--batch-size", "8", "--max-steps",
               str(args.steps), "--warmup-steps", str(max(1, args.steps // 10)), "--lr", "1e-3",
               "--head-channels", "64", "--eval-mode", "whole", "--log-every", "50", "--eval-every", str(args.steps)]
    results: dict = {e: {"mIoU": [], "mAcc": [], "aAcc": [], "seeds": []} for e in ENCODERS}
    started = time.time()
    for seed in args.seeds:
        for encoder in ENCODERS:
            source = []
            if encoder != "random":
                pre = args.work / f"pretrain-{encoder}-s{seed}"
                if not (pre / "last.pt").is_file():
                    _lomar("pretrain", "--method", encoder, *pretrain, "--seed", str(seed), "--out", str(pre))
                source = ["--pretrained", str(pre / "last.pt")]
            out = args.work / f"segment-{encoder}-s{seed}"
            if _final(out) is None or _final(out)["step"] < args.steps:
                _lomar("segment", *segment, *source, "--seed", str(seed), "--out", str(out),
                       *(["--resume", "auto"] if (out / "last.pt").is_file() else []))
            final = _final(out)
            for key in ("mIoU", "mAcc", "aAcc"):
                results[encoder][key].append(round(final[key], 2))
            results[encoder]["seeds"].append(seed)
    summary = {e: {k: round(statistics.fmean(v), 2) for k, v in r.items() if k != "seeds"} for e, r in results.items()}
    record = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "what": "lomar segment (UperNet) on lomar compose-digits, final whole-image evaluation; mIoU/mAcc/aAcc in "
                "percent over the 10 digit classes (background is label 0, ignored as ADE20K's reduce-zero-label)",
        "pretrain_flags": shlex.join(pretrain), "segment_flags": shlex.join(segment), "per_seed": results,
        "mean": summary, "minutes": round((time.time() - started) / 60, 1),
    }
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
