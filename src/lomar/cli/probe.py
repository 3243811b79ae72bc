"""``lomar knn`` and ``lomar linprobe``: frozen-feature evaluation of a pretrained encoder.

Both compute the features once (centre crops, :func:`lomar.eval.features.eval_transform`), then
score them: k-NN directly, the linear probe by training BatchNorm + Linear on them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lomar.cli.common import (
    DEVICE_HELP,
    check_output_file,
    device_flag,
    int_range,
    non_negative_float,
    positive_float,
    resolve_device,
    write_json,
)
from lomar.errors import UsageError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("pretrained", help="our pretrain/finetune checkpoint, an exported or run folder, "
                                      "or an original LoMaR / MAE checkpoint")
    p.add_argument("--data", help="ImageFolder root holding train/ and val/ (default: none)")
    p.add_argument("--train", help="training split root, instead of --data (default: none)")
    p.add_argument("--val", help="validation split root, instead of --data (default: none)")
    p.add_argument("--img-size", type=int_range(1), default=224, help="centre-crop size in pixels")
    p.add_argument("--pool", choices=("mean", "cls"), default="mean",
                   help="feature: mean of the normed patch tokens or the normed cls token")
    p.add_argument("--batch-size", type=int_range(1), default=128, help="images per forward pass")
    p.add_argument("--workers", type=int_range(0), default=4, help="data-loading processes")
    p.add_argument("--device", type=device_flag, default="auto", help=DEVICE_HELP)
    p.add_argument("--json", metavar="FILE", help="also write the result to this JSON file (default: none)")


def _check(args: argparse.Namespace) -> None:
    """Everything that can be checked before the features are computed, outputs included."""
    if not (args.data or (args.train and args.val)):
        raise UsageError("pass --data ROOT (with train/ and val/) or both --train and --val")
    for flag, root in (("--data", args.data), ("--train", args.train), ("--val", args.val)):
        if root and not Path(root).is_dir():
            raise UsageError(f"{flag} {root} is not a folder; pass an ImageFolder root")
    if not Path(args.pretrained).exists():
        raise UsageError(f"{args.pretrained} does not exist; pass a checkpoint file or an exported folder")
    check_output_file(args.json, "--json", create_parents=True)
    check_output_file(getattr(args, "save", None), "--save", create_parents=True)


def _features(args: argparse.Namespace):
    """(train_x, train_y, val_x, val_y) features of both splits; UsageError on bad input."""
    from lomar.eval.features import extract_features, knn_loaders, load_pretrained_encoder

    _check(args)
    device = resolve_device(args.device)
    try:
        loaders = knn_loaders(args.train or args.data, args.val if args.train else None, args.img_size,
                              args.batch_size, args.workers)
        encoder = load_pretrained_encoder(args.pretrained, img_size=args.img_size).to(device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"lomar {args.command}: {encoder.load_report.summary()}", file=sys.stderr)
    out = []
    for loader in loaders:
        out.extend(extract_features(encoder, loader, device, args.pool))
    return out


def knn_add_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--k", type=int_range(1), default=20, help="neighbours")
    p.add_argument("--temperature", type=positive_float, default=0.07,
                   help="votes weigh exp(cosine / T); a finite number > 0")


def knn_run(args: argparse.Namespace) -> int:
    from lomar.eval.knn import knn_predict

    train_x, train_y, val_x, val_y = _features(args)
    classes = int(max(train_y.max(), val_y.max())) + 1
    pred = knn_predict(train_x, train_y, val_x, classes, args.k, args.temperature).argmax(1)
    top1 = float((pred == val_y).float().mean())
    print(f"k-NN (k={args.k}, T={args.temperature}, {args.pool} features) top-1: {100 * top1:.2f}% "
          f"({len(val_y)} val / {len(train_y)} train images)")
    if args.json:
        write_json(args.json, {"knn_top1": top1, "k": args.k, "temperature": args.temperature, "pool": args.pool,
                               "train_images": len(train_y), "val_images": len(val_y)})
    return 0


def linprobe_add_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--epochs", type=int_range(1), default=90, help="passes over the training features")
    p.add_argument("--lr", type=positive_float, default=1e-2, help="AdamW peak lr (cosine to 0)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--probe-batch-size", type=int_range(1), default=256, help="features per probe step")
    p.add_argument("--seed", type=int_range(0), default=0, help="seed of the probe's init and shuffling")
    p.add_argument("--save", metavar="FILE", help="write the trained probe's state dict here (default: none)")


def linprobe_run(args: argparse.Namespace) -> int:
    from lomar.checkpoints.io import atomic_save
    from lomar.eval.linear_probe import train_linear_probe

    train_x, train_y, val_x, val_y = _features(args)
    try:
        probe, top1 = train_linear_probe(train_x, train_y, val_x, val_y, epochs=args.epochs,
                                         batch_size=args.probe_batch_size, lr=args.lr,
                                         weight_decay=args.weight_decay, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"linear probe ({args.pool} features, {args.epochs} epochs) top-1: {100 * top1:.2f}% "
          f"({len(val_y)} val / {len(train_y)} train images)")
    if args.save:
        atomic_save({"probe": probe.state_dict(), "pool": args.pool, "top1": top1}, args.save)
    if args.json:
        write_json(args.json, {"linprobe_top1": top1, "epochs": args.epochs, "lr": args.lr, "pool": args.pool,
                               "train_images": len(train_y), "val_images": len(val_y)})
    return 0
