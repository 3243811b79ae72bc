"""``lomar tokenizer fit|convert``: BEiT's visual tokenizers.

``fit`` fits the built-in k-means tokenizer (normalised --patch px patches of views 14 patches wide, 8 px of
112 px by default; not the paper's dVAE) on a folder of images; ``convert`` rewrites a DALL-E dVAE encoder (the
official pickled ``encoder.pkl``, read without executing its code, or a state dict) as safetensors.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lomar.cli.app import command_prefix
from lomar.cli.common import check_input, check_output_file, resolve_device
from lomar.errors import UsageError, in_flags
from lomar.limits import MAX_IMG_SIZE
from lomar.train import settings as S
from lomar.train.setting_flags import add_settings
from lomar.train.settings import Setting

__all__ = ["add_arguments", "run"]

_MAX_VIEW_BYTES = 4 << 30  # the patches of 2048 views of 112 px take 0.3 GiB; of 512 px, 6 GiB
# BEiT's grid (ViT/16 on 224 px): a token then covers 1/14 of the crop's side whatever --patch, as the dVAE's and
# the built-in tokenizer's 8 px of 112 px. Only the fit reads it: a run resizes its view to grid x --patch.
_TOKENS_PER_SIDE = 14


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True,
                               help="fit: a k-means tokenizer on images; convert: a dVAE encoder to safetensors")
    fit = sub.add_parser("fit", help="fit the built-in k-means tokenizer on a folder of images",
                         description="Fit k-means over per-patch normalised pixels of the images' centre "
                                     "crops at --size px (a BEiT target when no dVAE is at hand; fit it at "
                                     "the model's --patch-size for `lomar pretrain --decode windows`).")
    add_settings(fit, {
        "data": S.DATA.but(required=True, help="image folder (recursive) or .txt list of paths"),
        "vocab": Setting(8192, "vocabulary size", above=0),
        "out": S.TO.but(metavar="FILE.safetensors", help="where to write the tokenizer (safetensors)"),
        "size": Setting(None, f"view size in px, a multiple of --patch (default: {_TOKENS_PER_SIDE} x --patch, "
                              f"{_TOKENS_PER_SIDE}x{_TOKENS_PER_SIDE} tokens: 112 with the default --patch 8)",
                        kind=int, above=0),
        "patch": Setting(8, "pixels per token", above=0, high=MAX_IMG_SIZE),
        "iters": Setting(20, "Lloyd iterations at most", above=0),
        "max_images": Setting(2048, "images used at most, drawn at random (--seed) across --data", above=0),
        "seed": S.SEED,
        "device": S.DEVICE.but(help="where the k-means iterations run: auto (CUDA if available), cpu, cuda or "
                                    "cuda:N (the default's 20 take about 13 minutes on 2 CPU cores)"),
        "overwrite": S.OVERWRITE.but(help="replace FILE if it exists"),
    })
    conv = sub.add_parser("convert", help="write a dVAE encoder (encoder.pkl or state dict) as safetensors")
    add_settings(conv, {
        "source": Setting(None, "official dall_e encoder.pkl, {'model': sd} or sd", kind=str, flag="",
                          metavar="encoder.pkl"),
        "to": S.TO.but(metavar="dvae.safetensors", help="where to write the dVAE encoder (safetensors)"),
        "overwrite": S.OVERWRITE.but(help="replace dvae.safetensors if it exists"),
    })


def _sample(paths, limit: int, seed: int) -> list:
    """``limit`` of ``paths`` drawn (seeded) across the whole list, in list order. A folder is listed
    sorted, so its first images are its first classes: ImageNet's first 2048 are two kinds of fish."""
    import torch

    if len(paths) <= limit:
        return list(paths)
    picked = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return [paths[i] for i in picked.tolist()]


def _image_paths(data: str, limit: int, seed: int) -> list:
    """``limit`` of --data's images (:func:`_sample`); ValueError naming the fix for a path that is missing, holds
    no images or is a shard pattern. Listed before the fit says it starts, so that a bad --data is one line."""
    from lomar.data.folder import build_image_list  # torch: not for --help
    from lomar.data.shards import is_shard_pattern  # torch: not for --help

    if is_shard_pattern(data):  # build_image_list's advice would go round: a shard -> its folder -> a pattern
        raise ValueError(f"--data {data}: tokenizer fit reads an image folder or a .txt list of paths, not tar "
                         f"shards; pass a folder of some of the images, or let `lomar pretrain --method beit "
                         f"--data {data}` fit the tokenizer on the shards (saved as OUT/tokenizer.safetensors)")
    return _sample(build_image_list(data), limit, seed)


def _views(paths: list, data: str, size: int, read: dict):
    """Yields (3, size, size) in [0, 1]: the centre squares of ``paths`` (:func:`_image_paths` of ``data``),
    resized (bicubic, antialiased), one at a time, so that only their patches are held; ``read`` gets the counts."""
    import torch.nn.functional as F

    from lomar.data.collate import UNREADABLE_LIMIT, BadDataTracker  # torch: not for --help
    from lomar.data.decode import load_image  # torch: not for --help

    bad = BadDataTracker(len(paths))  # logs each unreadable file once, with why
    read.update(images=0, bad=0)
    for path in paths:
        try:
            image = load_image(path)
        except ValueError as exc:
            bad.update([str(exc)], 1)  # names the file and why
            continue
        bad.update([], 1)
        h, w = image.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = image[:, top:top + side, left:left + side].float()[None] / 255
        read["images"] += 1
        yield F.interpolate(square, size=(size, size), mode="bicubic", antialias=True,
                            align_corners=False).clamp(0, 1)[0]
    if not read["images"]:
        raise ValueError(f"none of the {len(paths)} images in {data} could be read")
    bad.check(UNREADABLE_LIMIT)  # as pretraining: a tokenizer of another set of images than the one asked for
    read["bad"] = bad.count


_FLAGS = {"vocab_size": "--vocab", "input_size": "--size", "patch": "--patch"}


def _view_size(size: int | None, patch: int, images: int) -> int:
    """--size, or by default --patch's for a 14x14 grid; ValueError naming the fix where --patch does not divide it,
    it is over MAX_IMG_SIZE, or the views' patches would take more than _MAX_VIEW_BYTES (before anything is read)."""
    default, largest = _TOKENS_PER_SIDE * patch, MAX_IMG_SIZE // patch * patch
    if size is not None and size % patch:
        lower = size // patch * patch
        raise ValueError(f"--size {size} is not a multiple of --patch {patch}; pass --size "
                         f"{lower or patch}{f' or {lower + patch}' if lower else ''}, or drop --size "
                         f"(default {_TOKENS_PER_SIDE} x --patch = {default})")
    named = f"--size {size}" if size is not None else f"--size {default} (the default, {_TOKENS_PER_SIDE} x --patch)"
    size = default if size is None else size
    if size > MAX_IMG_SIZE and size == default:  # a --patch that large takes an explicit --size
        raise ValueError(f"{named} is over {MAX_IMG_SIZE} px, the largest view; pass --size {largest} or less")
    view_bytes = images * 3 * size ** 2 * 4  # the float32 patch features k-means holds
    fewer = _MAX_VIEW_BYTES // (3 * size ** 2 * 4) if size <= MAX_IMG_SIZE else 0
    smaller = min(largest, int((_MAX_VIEW_BYTES / (images * 12)) ** 0.5) // patch * patch)
    fixes = [f"--max-images {fewer} or fewer" if fewer else "",
             f"--size {smaller} or less (a multiple of --patch {patch})" if smaller else ""]
    if view_bytes > _MAX_VIEW_BYTES and any(fixes):  # none: the size is over MAX_IMG_SIZE, refused below
        raise ValueError(f"{named} with --max-images {images} needs {view_bytes / 2**30:,.1f} GiB of views (limit "
                         f"{_MAX_VIEW_BYTES >> 30} GiB); pass {' or '.join(fix for fix in fixes if fix)}")
    if size > MAX_IMG_SIZE:  # else refused by the tokenizer once fitted
        raise ValueError(f"{named} is over {MAX_IMG_SIZE} px, the largest view; pass --size {largest} or less")
    return size


def run(args: argparse.Namespace) -> int:
    flag, target = ("--to", args.to) if args.tokenizer_command == "convert" else ("--out", args.out)
    # A BEiT run names its tokenizer by path (OUT/tokenizer.safetensors when fitted): replacing that file unasked
    # would resume the run against another tokenizer's targets.
    check_output_file(target, flag, overwrite=args.overwrite, create_parents=True, example="tokenizer.safetensors")
    if Path(target).suffix.lower() != ".safetensors":  # torch.load and the like would take x.pt for a pickle
        raise UsageError(f"{flag} {target}: a tokenizer is written as safetensors; give a name ending in "
                         f".safetensors, e.g. {flag} {Path(target).with_suffix('.safetensors')}")
    me = command_prefix(args)  # lomar tokenizer fit / convert
    if args.tokenizer_command == "convert":  # as convert_dvae's
        check_input(args.source, f"dVAE file {args.source} does not exist; check the path")
    from lomar.tokenizers import convert_dvae, fit_kmeans_tokenizer  # torch: not for --help; after the checks

    try:
        if args.tokenizer_command == "convert":
            path = convert_dvae(args.source, args.to)
            print(f"{me}: wrote {path}")
            return 0
        size = _view_size(args.size, args.patch, args.max_images)
        device = resolve_device(args.device)
        read: dict = {}
        views = _views(_image_paths(args.data, args.max_images, args.seed), args.data, size, read)
        start = time.monotonic()
        print(f"{me}: fitting a k-means tokenizer (vocabulary {args.vocab}) on up to {args.max_images} images of "
              f"{args.data} at {size} px on {device}", flush=True)

        def progress(iteration: int, patches: int, changed: int) -> None:  # the default fit runs for minutes
            print(f"{me}: k-means iteration {iteration}/{args.iters}: {changed:,} of {patches:,} patches "
                  f"changed token ({time.monotonic() - start:.0f} s)", flush=True)

        tokenizer = fit_kmeans_tokenizer(views, vocab_size=args.vocab, patch=args.patch, seed=args.seed,
                                         iters=args.iters, input_size=size, progress=progress, device=device)
        tokenizer.save(args.out, extra={"fitted_on": str(args.data), "images": str(read["images"])})
    except (ValueError, FileNotFoundError) as exc:  # the library's argument names, as the flags spell them
        raise UsageError(in_flags(str(exc).splitlines()[0], _FLAGS)) from None
    skipped = f", {read['bad']} unreadable skipped" if read["bad"] else ""
    print(f"{me}: wrote {args.out} (vocabulary {tokenizer.vocab_size}, {read['images']} images{skipped})")
    return 0
