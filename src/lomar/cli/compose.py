"""``lomar compose-digits``: the offline detection / segmentation set (see :mod:`lomar.data.compose`)."""

from __future__ import annotations

import argparse
import sys

from lomar.cli.common import check_output_dir
from lomar.errors import UsageError
from lomar.limits import MAX_IMG_SIZE
from lomar.train import settings as S
from lomar.train.setting_flags import add_settings
from lomar.train.settings import Setting
from lomar.values import counted

__all__ = ["add_arguments", "run", "SETTINGS"]

SETTINGS = {
    "out": S.TO.but(metavar="DIR", help="folder to write: COCO (annotations/instances_*.json, "
                     "images/train|val) and ADE20K (images|annotations/training|validation) layouts"),
    "img_size": S.IMG_SIZE.but(default=256, help="side of the square pictures in pixels (>= 32)"),
    "images": Setting(200, "pictures in both splits together", kind=int, above=1),
    "seed": S.SEED.but(help="seed of every draw: the same flags give the same files"),
    "val_fraction": Setting(0.25, "share of the pictures and of the digit samples held out for validation",
                            above=0, below=1),
    "per_image": Setting((2, 5), "digits per picture, LOW HIGH (fewer when no free spot is left)", kind=int,
                         low=1, nargs=2, metavar=("LOW", "HIGH")),
    "digit_scale": Setting((0.12, 0.4), "digit side as a fraction of the picture's, LOW HIGH", kind=float,
                           above=0, high=1, nargs=2, metavar=("LOW", "HIGH")),
    "classify_images": Setting(0, "also write this many one-digit pictures as ImageFolder classify/train|val/DIGIT "
                               "(0 = none)", low=0),
    "classify_size": Setting(224, "side of the one-digit pictures in pixels", low=32, high=MAX_IMG_SIZE),
    "overwrite": S.OVERWRITE.but(help="replace --out when it holds a set compose-digits wrote before"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Then e.g.: lomar segment --data DIR --num-classes 10; detection reads "
                     "DIR/annotations/instances_train.json with DIR/images/train.")
    add_settings(parser, SETTINGS)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    from lomar.data.compose import MIN_DIGIT, compose_digits  # torch: not for --help

    try:
        summary = compose_digits(**{name: getattr(args, name) for name in SETTINGS})
    except FileExistsError as exc:
        raise UsageError(f"--out {exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc).replace("img_size", "--img-size").replace("per_image", "--per-image")
                         .replace("digit_scale", "--digit-scale")) from None
    smallest = args.digit_scale[0] * args.img_size
    if smallest < MIN_DIGIT:
        print(f"lomar compose-digits: note: digits under {MIN_DIGIT} px are drawn at {MIN_DIGIT} px (--digit-scale "
              f"{args.digit_scale[0]:g} x --img-size {args.img_size} = {smallest:.3g} px)", file=sys.stderr)
    splits = summary["splits"]
    parts = [f"{name}: {counted(s['images'], 'picture')}, {counted(s['instances'], 'digit')}"
             + (f", {counted(s['classify_images'], 'one-digit picture')} in classify/{name}/"
                if s.get("classify_images") else "") for name, s in splits.items()]
    print(f"lomar compose-digits: wrote {args.out} ({'; '.join(parts)}; COCO and ADE20K layouts)")
    return 0
