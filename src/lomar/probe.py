"""``lomar knn`` and ``lomar linprobe``: frozen-feature evaluation of a pretrained encoder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .cli import UsageError
from .data import IMAGENET_MEAN, IMAGENET_STD


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("pretrained", help="our checkpoint, an exported folder or an original checkpoint")
    p.add_argument("--data", help="ImageFolder root holding train/ and val/")
    p.add_argument("--train", help="training split root (instead of --data)")
    p.add_argument("--val", help="validation split root (instead of --data)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the result to this JSON file")


def _features(args):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from .evaluate import extract_features, load_pretrained_encoder

    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    roots = [Path(args.train) if args.train else Path(args.data or "") / "train",
             Path(args.val) if args.val else Path(args.data or "") / "val"]
    if not (args.data or (args.train and args.val)):
        raise UsageError("pass --data ROOT (with train/ and val/) or both --train and --val")
    for root in roots:
        if not root.is_dir():
            raise UsageError(f"{root} is not a folder of class folders (ImageFolder layout)")
    if not Path(args.pretrained).exists():
        raise UsageError(f"{args.pretrained} does not exist")
    try:
        encoder = load_pretrained_encoder(args.pretrained).to(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    resize = int(round(args.img_size / 0.875))
    tf = v2.Compose([v2.ToImage(), v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                     v2.CenterCrop(args.img_size), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    out = []
    for root in roots:
        loader = DataLoader(ImageFolder(str(root), tf), args.batch_size, num_workers=args.workers)
        out.extend(extract_features(encoder, loader, args.device))
    return out


def _report(args, result: dict) -> int:
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def knn_add_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)


def knn_run(args: argparse.Namespace) -> int:
    from .evaluate import knn_predict

    train_x, train_y, val_x, val_y = _features(args)
    classes = int(max(train_y.max(), val_y.max())) + 1
    pred = knn_predict(train_x, train_y, val_x, classes, args.k, args.temperature).argmax(1)
    top1 = float((pred == val_y).float().mean())
    print(f"k-NN (k={args.k}, T={args.temperature}) top-1: {100 * top1:.2f}%")
    return _report(args, {"knn_top1": top1, "k": args.k, "temperature": args.temperature})


def linprobe_add_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)


def linprobe_run(args: argparse.Namespace) -> int:
    from .evaluate import train_linear_probe

    train_x, train_y, val_x, val_y = _features(args)
    _, top1 = train_linear_probe(train_x, train_y, val_x, val_y, epochs=args.epochs, lr=args.lr, seed=args.seed)
    print(f"linear probe top-1: {100 * top1:.2f}%")
    return _report(args, {"linprobe_top1": top1, "epochs": args.epochs})
