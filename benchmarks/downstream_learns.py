"""Does each downstream task learn? Tiny synthetic sets with an easy answer, detection and segmentation scored on
their own training pictures (memorisation is the point: a pipeline that cannot overfit 12 pictures has a fault, not
a budget), classification on other pictures of the same kind.

- classification (``finetune``, ``knn``, ``linprobe``): a coloured square (4 colours, 4 classes) on grey noise, 8
  training and 4 validation pictures a class;
- detection (``detect``): one bright box on noise, one category;
- segmentation (``segment``): a bright rectangle on noise, 2 classes (rectangle, background).

Finetune starts from a 1-step LoMaR pretraining (``--pretrained`` is required); detect and segment from a random
encoder. Chance: top-1 25 %, k-NN / linprobe 25 %, box AP ~0, mIoU ~ (fraction of the majority class) / 2.

    python benchmarks/downstream_learns.py --work /tmp/learns --json benchmarks/downstream-learns.json   # ~6 min
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (230, 30, 30), "green": (30, 230, 30), "blue": (30, 30, 230), "yellow": (230, 230, 30)}
COMMON = ["--workers", "0", "--threads", "1", "--device", "cpu"]
MILD_FINETUNE = ["--mixup", "0", "--cutmix", "0", "--smoothing", "0", "--reprob", "0", "--aa", "none",
                 "--drop-path", "0"]


def _lomar(*args: str) -> None:
    """Run one lomar command quietly; where it fails, its own output (the error that says why) and a one-line stop."""
    command = [sys.executable, "-m", "lomar", *args]
    print("$", shlex.join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"downstream_learns: lomar {args[0]} stopped with exit status {done.returncode} (its output "
                         f"above)")


def classification_set(root: Path, per_class: int, size: int, seed: int) -> Path:
    """root/{train,val}/<colour>/*.png: ``per_class`` training pictures a class, half as many others to validate."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(90, 160, (size, size, 3), dtype=np.uint8)
                side = int(rng.integers(size // 3, size // 2))
                x, y = (int(v) for v in rng.integers(0, size - side, 2))
                pixels[y:y + side, x:x + side] = colour
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root


def _bright_box(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A picture of dark noise with one bright box, a quarter to a half of each side, and the box (x, y, w, h)."""
    pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    w, h = int(rng.integers(width // 4, width // 2)), int(rng.integers(height // 4, height // 2))
    x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    pixels[y:y + h, x:x + w] = 230
    return pixels, (x, y, w, h)


def detection_set(root: Path, images: int, size: tuple[int, int], seed: int) -> tuple[Path, Path]:
    """One bright box (box and rectangle mask) on dark noise per picture; COCO instances file."""
    rng = np.random.default_rng(seed)
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "box"}]}
    height, width = size
    for i in range(images):
        pixels, (x, y, w, h) = _bright_box(rng, height, width)
        name = f"{i:03d}.png"
        Image.fromarray(pixels).save(folder / name)
        data["images"].append({"id": i + 1, "file_name": name, "width": width, "height": height})
        data["annotations"].append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, w, h],
                                    "area": w * h, "iscrowd": 0,
                                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    ann = root / "instances.json"
    ann.write_text(json.dumps(data))
    return ann, folder


def segmentation_set(root: Path, images: int, size: tuple[int, int], seed: int) -> Path:
    """ADE layout, training = validation: a bright rectangle (class 2 in the file) on noise (class 1)."""
    rng = np.random.default_rng(seed)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    height, width = size
    for i in range(images):
        pixels, (x, y, w, h) = _bright_box(rng, height, width)
        labels = np.ones((height, width), np.uint8)
        labels[y:y + h, x:x + w] = 2
        for split in ("training", "validation"):
            Image.fromarray(pixels).save(root / "images" / split / f"{i:03d}.png")
            Image.fromarray(labels).save(root / "annotations" / split / f"{i:03d}.png")
    return root


def _losses(out: Path) -> dict:
    """The mean training loss of the first and of the last 10 steps."""
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    first, last = losses[:10], losses[-10:]  # fewer than 10 in a run shortened by --steps
    return {"loss_first_10": round(sum(first) / len(first), 4), "loss_last_10": round(sum(last) / len(last), 4)}


def _evaluations(out: Path, key: str) -> list[dict]:
    """The metrics.jsonl records that hold ``key``, in order: the run's evaluations."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if key in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    tasks = ["finetune", "knn", "linprobe", "detect", "segment"]
    parser.add_argument("--tasks", nargs="+", choices=tasks, default=tasks)
    parser.add_argument("--steps", type=int, default=100, help="training steps of finetune, detect and segment")
    parser.add_argument("--recipe", action="store_true",
                        help="finetune and detect with their recipes' augmentation (mixup, cutmix, RandAugment, random "
                             "erasing, label smoothing, drop path; ViTDet's 0.1-2.0 jitter), not the mild one")
    parser.add_argument("--picture", type=int, nargs=2, default=(64, 64), metavar=("HEIGHT", "WIDTH"),
                        help="the detection and segmentation pictures' size (the input is 64 px: another size tries "
                             "the resizing of images, boxes, masks and scores)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work, seed, results = args.work, str(args.seed), {}
    work.mkdir(parents=True, exist_ok=True)
    steps = str(args.steps)
    if {"finetune", "knn", "linprobe"} & set(args.tasks):
        data = classification_set(work / "squares", 8, 32, args.seed)
        pre = work / "pre"
        if not (pre / "last.pt").is_file():
            _lomar("pretrain", "--data", str(data / "train"), "--out", str(pre), "--model", "vit_tiny_patch8",
                   "--embed-dim", "64", "--depth", "2", "--num-heads", "2", "--img-size", "32", "--window-size", "3",
                   "--windows", "2", "--batch-size", "8", "--max-steps", "1", "--precision", "fp32", *COMMON)
        started = time.time()
        if "finetune" in args.tasks:
            out = work / f"finetune-{seed}"
            _lomar("finetune", "--pretrained", str(pre / "last.pt"), "--data", str(data), "--out", str(out),
                   "--img-size", "32", "--batch-size", "8", "--max-steps", steps, "--blr", "0.05",
                   "--warmup-epochs", "1", *([] if args.recipe else MILD_FINETUNE), "--seed", seed, "--overwrite",
                   *COMMON)
            evaluations = _evaluations(out, "top1")
            first, last = evaluations[0], evaluations[-1]  # one and the same in a run of one evaluation
            results["finetune"] = {"top1": last["top1"], "first_top1": first["top1"],
                                   "first_eval_step": first["step"], **_losses(out)}
        for task in ("knn", "linprobe"):
            if task in args.tasks:
                path = work / f"{task}-{seed}.json"
                _lomar(task, "--pretrained", str(pre / "last.pt"), "--data", str(data), "--img-size", "32",
                       "--json", str(path), *COMMON)
                results[task] = json.loads(path.read_text())
        results["classification_s"] = round(time.time() - started, 1)
    if "detect" in args.tasks:
        ann, images = detection_set(work / "boxes", 12, tuple(args.picture), args.seed)
        out = work / f"detect-{seed}"
        started = time.time()
        _lomar("detect", "--model", "vit_tiny_patch16", "--img-size", "64", "--train-ann", str(ann),
               "--train-images", str(images), "--val-ann", str(ann), "--val-images", str(images), "--out", str(out),
               "--batch-size", "4", "--max-steps", steps, "--warmup-steps", "10", "--blr", "0.0128",
               *([] if args.recipe else ["--jitter", "0.8", "1.25"]), "--rois-per-image", "32", "--eval-every", steps,
               "--seed", seed, "--overwrite", *COMMON)
        record = _evaluations(out, "box_AP")[-1]
        results["detect"] = {**{k: record[k] for k in ("box_AP", "box_AP50", "mask_AP", "mask_AP50")}, **_losses(out)}
        results["detect_s"] = round(time.time() - started, 1)
    if "segment" in args.tasks:
        root = segmentation_set(work / "regions", 12, tuple(args.picture), args.seed)
        out = work / f"segment-{seed}"
        started = time.time()
        _lomar("segment", "--model", "vit_tiny_patch16", "--img-size", "64", "--data", str(root), "--num-classes",
               "2", "--out", str(out), "--batch-size", "4", "--max-steps", steps, "--warmup-steps", "10",
               "--lr", "1e-3", "--head-channels", "32", "--eval-mode", "whole", "--eval-every", steps,
               "--seed", seed, "--overwrite", *COMMON)
        record = _evaluations(out, "mIoU")[-1]
        results["segment"] = {**{k: record[k] for k in ("mIoU", "mAcc", "aAcc")}, **_losses(out)}
        results["segment_s"] = round(time.time() - started, 1)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
