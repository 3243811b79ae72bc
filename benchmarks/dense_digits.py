"""Detection and segmentation evidence on the composed digits set (issue 20, item 4), on CPU.

`lomar compose-digits` writes scikit-learn's handwritten digits pasted on the bundled photographs,
in COCO and ADE20K layouts. Each seed pretrains a tiny ViT with LoMaR and with MAE for the same
number of steps on the training pictures (no labels), then finetunes Mask R-CNN (`lomar detect`)
and UperNet (`lomar segment`) from each of them and from a randomly initialised encoder: equal
steps, one short recipe fixed a priori, the same for every encoder. The final evaluation's box_AP,
mask_AP (COCO, pycocotools) and mIoU per encoder and seed go to ``--json`` with the commands.

    python benchmarks/dense_digits.py --work /tmp/dense                  # 2 seeds, ~1.5 h on one core
    python benchmarks/dense_digits.py --work /tmp/dense --seeds 0 --pretrain-steps 20 \
        --detect-steps 10 --segment-steps 10 --json /tmp/look.json      # a look

Resumable: a finished run is not run again; an interrupted one resumes from its checkpoint.
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
DETECT_KEYS = ("box_AP", "box_AP50", "mask_AP", "mask_AP50")
SEGMENT_KEYS = ("mIoU", "mAcc", "aAcc")


def _lomar(*args: str) -> None:
    command = [sys.executable, "-m", "lomar", *args]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def _final(out: Path, key: str) -> dict | None:
    """The last metrics.jsonl record that holds ``key`` (the final evaluation), or None."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    evals = [json.loads(x) for x in path.read_text().splitlines() if f'"{key}"' in x]
    return evals[-1] if evals else None


def _finetune(command: str, flags: list[str], out: Path, steps: int, key: str) -> dict:
    final = _final(out, key)
    if final is None or final["step"] < steps:
        _lomar(command, *flags, "--out", str(out), *(["--resume", "auto"] if (out / "last.pt").is_file() else []))
        final = _final(out, key)
    return final


def _mean_sd(values: list[float]) -> list[float]:
    return [round(statistics.fmean(values), 2), round(statistics.stdev(values), 2) if len(values) > 1 else 0.0]


def report(record: dict, keys: tuple[str, ...]) -> str:
    """The JSON's numbers as a Markdown table (mean ± sd over the seeds) with the exact commands."""
    rows = [f"| {e} | " + " | ".join(f"{m:.2f} ± {sd:.2f}" for m, sd in (record["mean_sd"][e][k] for k in keys)) + " |"
            for e in ENCODERS]
    return "\n".join([
        "# Dense digits: detection and segmentation per encoder (CPU)", "", record["what"] + ".", "",
        f"Command: `{record['command']}` ({record['minutes']} min); seeds {record['lomar']['seeds']}.", "",
        "| encoder | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 1) + "|", *rows, "",
        "Per-seed values are in the JSON beside this file. Flags of every run:", "",
        *(f"- {name}: `{record[name + '_flags']}`" for name in ("pretrain", "mae_decoder", "detect", "segment")), ""])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("dense-digits.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--model", default="vit_tiny_patch16")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--detect-steps", type=int, default=250)
    p.add_argument("--segment-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args()
    data = args.work / "data"
    if not (data / "compose.json").is_file():
        _lomar("compose-digits", "--out", str(data), "--img-size", str(args.img_size), "--images", str(args.images),
               "--seed", "0")
    # --model names the pretrained encoders and the random one; a --pretrained encoder brings its own
    common = ["--img-size", str(args.img_size), "--threads", str(args.threads), "--workers", "1", "--device",
              args.device]
    # lr 1e-3 with a warm-up over the first 10 % (a new run given --max-steps spans its schedule
    # over them); MAE's decoder scaled to the tiny encoder (MAE-base's is 512 wide, 8 blocks)
    pretrain = [*common, "--model", args.model, "--data", str(data / "images" / "train"), "--batch-size", "16",
                "--max-steps", str(args.pretrain_steps), "--lr", "1e-3", "--log-every", "100"]
    mae_decoder = ["--decoder-embed-dim", "128", "--decoder-depth", "2", "--decoder-num-heads", "4"]
    # Mask R-CNN: lr 2e-4 at batch 4 (blr x 4 / 256), 32 RoIs per image (ViTDet's 4conv1fc box head
    # on 512 RoIs is most of a CPU step), ViTDet's step schedule over the run
    detect = [*common, "--train-ann", str(data / "annotations" / "instances_train.json"), "--train-images",
              str(data / "images" / "train"), "--val-ann", str(data / "annotations" / "instances_val.json"),
              "--val-images", str(data / "images" / "val"), "--batch-size", "4", "--blr", "0.0128",
              "--max-steps", str(args.detect_steps), "--warmup-steps", str(max(1, args.detect_steps // 10)),
              "--rois-per-image", "32", "--log-every", "50", "--eval-every", str(args.detect_steps)]
    segment = [*common, "--data", str(data), "--num-classes", "10", "--batch-size", "8", "--max-steps",
               str(args.segment_steps), "--warmup-steps", str(max(1, args.segment_steps // 10)), "--lr", "1e-3",
               "--head-channels", "64", "--eval-mode", "whole", "--log-every", "50",
               "--eval-every", str(args.segment_steps)]
    keys = (*DETECT_KEYS, *SEGMENT_KEYS)
    results: dict = {e: {**{k: [] for k in keys}, "seeds": []} for e in ENCODERS}
    started = time.time()
    for seed in args.seeds:
        for encoder in ENCODERS:
            source = ["--model", args.model]
            if encoder != "random":
                pre = args.work / f"pretrain-{encoder}-s{seed}"
                if not (pre / "last.pt").is_file():
                    _lomar("pretrain", "--method", encoder, *pretrain, *(mae_decoder if encoder == "mae" else []),
                           "--seed", str(seed), "--out", str(pre))
                source = ["--pretrained", str(pre / "last.pt")]
            seeded = [*source, "--seed", str(seed)]
            boxes = _finetune("detect", [*detect, *seeded], args.work / f"detect-{encoder}-s{seed}",
                              args.detect_steps, "box_AP")
            pixels = _finetune("segment", [*segment, *seeded], args.work / f"segment-{encoder}-s{seed}",
                               args.segment_steps, "mIoU")
            for key in DETECT_KEYS:
                results[encoder][key].append(round(boxes[key], 2))
            for key in SEGMENT_KEYS:
                results[encoder][key].append(round(pixels[key], 2))
            results[encoder]["seeds"].append(seed)
    summary = {e: {k: _mean_sd(r[k]) for k in keys} for e, r in results.items()}
    record = {
        "command": shlex.join(["python", "benchmarks/dense_digits.py", *sys.argv[1:]]),
        "what": "lomar detect (Mask R-CNN, ViTDet backbone) and lomar segment (UperNet) on lomar compose-digits "
                f"({args.images} pictures of {args.img_size} px, 75/25 split), final evaluation on the val split; "
                "box_AP/mask_AP as pycocotools reports them, mIoU/mAcc/aAcc over the 10 digit classes "
                "(background is label 0, ignored as ADE20K's reduce-zero-label); all in percent",
        "img_size": args.img_size, "model": args.model,
        "pretrain_flags": shlex.join(pretrain), "mae_decoder_flags": shlex.join(mae_decoder),
        "detect_flags": shlex.join(detect), "segment_flags": shlex.join(segment),
        **results, "mean_sd": summary, "minutes": round((time.time() - started) / 60, 1),
    }
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    args.json.with_suffix(".md").write_text(report(record, keys))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
