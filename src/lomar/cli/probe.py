"""``lomar knn`` and ``lomar linprobe``: frozen-feature evaluation of a pretrained encoder.

Both compute the features once (centre crops, :func:`lomar.eval.features.eval_transform`), then
score them: k-NN directly, the linear probe by training BatchNorm + Linear on them. Under torchrun every process
extracts its share of each split (:mod:`lomar.eval.knn_shared`) and the main one scores, prints and writes.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

from lomar.checkpoints.file_names import BEST, CONFIG_NAME, ENCODER_WEIGHTS, LAST, LAST_POINTER, RUN_ENCODER
from lomar.cli.common import check_checkpoint, check_output_file, resolve_device, write_json
from lomar.errors import LomarError, UsageError, first_on_machine, in_flags, leave_it_to_the_first_process
from lomar.train import settings as S
from lomar.train.config_checks import EVAL_DECODES, check_warmup
from lomar.train.runtime import default_workers, use_threads
from lomar.train.setting_flags import add_settings
from lomar.train.settings import Setting
from lomar.values import percent_text

COMMON = {
    "pretrained_path": S.PRETRAINED.but(flag="", nargs="?", metavar="PRETRAINED", help=S.PRETRAINED.help +
                                        " (or pass it as --pretrained)"),
    "pretrained": S.PRETRAINED.but(help="the same as the positional PRETRAINED (default: the positional one)"),
    "data": S.DATA, "train": S.TRAIN, "val": S.VAL,
    "img_size": S.IMG_SIZE.but(default=None, help="centre-crop size in pixels (default: the checkpoint's training "
                                                  "size)"),
    "pool": Setting("mean", "feature: mean of the normed patch tokens or the normed cls token",
                    choices=("mean", "cls")),
    "batch_size": S.BATCH_SIZE.but(default=128, help="images per forward pass"),
    "decode": S.DECODE.but(takes=EVAL_DECODES, help="how images are decoded: full = the whole photo (reference); "
                           "draft = a JPEG at 1/2-1/8 scale while its short side stays at least the resize's (same "
                           "crops, pixels within about a level of 255; a 12 MP photo 4x faster)"),
    "workers": S.WORKERS, "threads": S.THREADS, "device": S.DEVICE, "json": S.JSON,
    "overwrite": S.OVERWRITE.but(help="replace the --json FILE if it exists"),
}
KNN = {**COMMON, "k": Setting(20, "neighbours", above=0),
       "temperature": Setting(0.07, "votes weigh exp(cosine / T)", above=0)}
LINPROBE = {
    **COMMON,
    "protocol": Setting("adamw", "adamw = AdamW on the features, cosine to 0 (the default: cheap and robust on small "
                        "sets); mae = MAE's protocol: LARS, lr = --blr x probe batch / 256, --warmup-epochs, cls "
                        "features (what MAE and LoMaR numbers quote)", choices=("adamw", "mae")),
    "pool": COMMON["pool"].but(default=None, help="feature: mean of the normed patch tokens or the normed cls token "
                               "(default: mean for --protocol adamw, cls for mae, as MAE probes)"),
    "epochs": S.EPOCHS.but(default=90, help="passes over the training features"),
    "lr": S.LR.but(default=1e-2, help="--protocol adamw: AdamW peak lr (cosine to 0)"),
    "blr": S.BLR.but(default=0.1, help="--protocol mae: base lr of LARS, lr = blr x --probe-batch-size / 256"),
    "warmup_epochs": S.WARMUP_EPOCHS.but(default=10, help="--protocol mae: epochs of linear warm-up, in [0, --epochs]"),
    "weight_decay": S.WEIGHT_DECAY.but(default=0.0),
    "probe_batch_size": Setting(256, "features per probe step (at least 2: the probe's BatchNorm needs two)", low=2),
    "seed": S.SEED.but(help="seed of the probe's init and shuffling"),
    "save": Setting(None, "write the probe on its frozen encoder here, a classifier that lomar.load_model rebuilds and "
                    "lomar predict runs (the encoder's weights too: about 340 MB for a ViT-B; default: not written)",
                    kind=str, metavar="FILE"),
    "overwrite": S.OVERWRITE.but(help="replace the --json or --save FILE if it exists"),
}


_PROTOCOL_FLAGS = {"adamw": ("lr", "weight_decay"), "mae": ("blr", "warmup_epochs")}  # what only one protocol reads

knn_add_arguments = functools.partial(add_settings, settings=KNN)
linprobe_add_arguments = functools.partial(add_settings, settings=LINPROBE)


class Frozen(NamedTuple):
    """What :func:`frozen_features` read of both splits through the frozen encoder."""

    features: tuple  # (train_x, train_y, val_x, val_y): each split's (N, D) features and (N,) int64 labels
    skipped: dict[str, int]  # each split's unreadable images left out, every process's: {"train": K, "val": K}
    classes: list[str]  # the training split's class names in label order
    encoder: Any = None  # the encoder, where asked for (linprobe's --save writes it with the probe)

    def images(self) -> dict:
        """A --json's account of the images scored: ``train_images`` and ``val_images``, each ``{"scored",
        "skipped"}``, as a training command's ``metrics.jsonl`` records an evaluation's ``val_images``."""
        from lomar.train.eval_only import images_record  # torch: not for --help

        _, train_y, _, val_y = self.features
        return {**images_record("train", len(train_y), self.skipped["train"]),
                **images_record("val", len(val_y), self.skipped["val"])}


def frozen_features(args: argparse.Namespace, say=lambda msg: None, device: str | None = None,
                    with_encoder: bool = False) -> Frozen | None:
    """The frozen encoder's features of both splits, on ``device`` (default: ``--device``'s), with the encoder where
    ``with_encoder`` (else it is freed with the call: a study keeps many cells' features); UsageError on bad input. In
    a process group of several (torchrun) each process extracts its share and the main one gets the whole splits
    (:func:`lomar.eval.knn_shared.split_features`); None on the others."""
    from lomar.data.classify import eval_resize  # torch: not for --help
    from lomar.data.collate import BadDataTracker  # torch: not for --help
    from lomar.data.small_images import SmallImages  # torch-free, but --help reads no lomar.data module
    from lomar.eval.features import knn_loaders, load_pretrained_encoder, skipped_note  # torch: not for --help
    from lomar.eval.knn_shared import split_features  # torch: not for --help

    device, size = device or resolve_device(args.device), {"img_size": args.img_size} if args.img_size else {}
    try:
        encoder = load_pretrained_encoder(args.pretrained, **size).to(device)
        args.img_size = args.img_size or encoder.config.img_size  # the checkpoint's training size
        # --train / --val each replace ROOT/train / ROOT/val of --data, as in finetune
        train, val = args.train or Path(args.data) / "train", args.val or Path(args.data) / "val"
        # every process lists the folders: the first of each machine says what it found (another's may differ)
        loaders = knn_loaders(train, val, args.img_size, args.batch_size,
                              default_workers() if args.workers is None else args.workers, decode=args.decode,
                              warn=first_on_machine())
    except ValueError as exc:  # the library's parameters (an original checkpoint's num_heads=...) as flags
        settings = KNN if args.command == "knn" else LINPROBE
        raise UsageError(in_flags(str(exc), {name: s.name_flag(name) for name, s in settings.items()})) from None
    say(f"{encoder.load_report.summary()}; {args.img_size} px crops")
    features, skipped = [], {}
    for name, loader in zip(("train", "val"), loaders):  # more than UNREADABLE_LIMIT of a split stops here
        bad = BadDataTracker(len(loader.dataset), warn=False)  # the loader warned of each file
        small = SmallImages(eval_resize(args.img_size))  # the resize enlarges them: the user's data may not be meant so
        split = split_features(encoder, loader, device, args.pool, bad, small=small)  # every process's counted
        features += split or ()
        skipped[name] = bad.count
        if bad.count:
            say(skipped_note(loader.dataset.root, bad.count))
        if small.count:
            say(f"{loader.dataset.root}: {small.line()}")
    if not features:
        return None
    return Frozen(tuple(features), skipped, loaders[0].dataset.classes, encoder if with_encoder else None)


# What a run or export folder's readers load (a run folder without an export: its best.pt, else last.pt, else the
# checkpoint-N.dcp its last.json names): an output on one of them would replace the checkpoint it scores.
_READ_IN_FOLDER = (BEST, LAST, LAST_POINTER, CONFIG_NAME, ENCODER_WEIGHTS, RUN_ENCODER)


def _check_not_read(path: str | None, flag: str, pretrained: str) -> None:
    if path is None:
        return
    source = Path(pretrained).resolve()
    read = [source / name for name in _READ_IN_FOLDER] if source.is_dir() else [source]
    if Path(path).resolve() in read:
        raise UsageError(f"{flag} {path} is a file of the checkpoint {pretrained} being scored: writing it would "
                         f"replace that checkpoint; give another file")


def _features(args: argparse.Namespace, resolve=None, with_encoder: bool = False) -> Frozen | None:
    """:func:`frozen_features`, after everything that can be checked before (outputs too); under torchrun each process
    extracts its share in a process group of its own, and the main process gets them all (the others None), which it
    alone says and scores. Every process meets a bad input alike: the first of each machine says it
    (:func:`~lomar.errors.leave_it_to_the_first_process`), ``resolve(args)``'s refusals too."""
    try:
        if resolve is not None:
            resolve(args)
        _check(args)
        return _extracted(args, with_encoder)
    except LomarError:
        leave_it_to_the_first_process()
        raise


def _check(args: argparse.Namespace) -> None:
    if args.pretrained and args.pretrained_path and args.pretrained != args.pretrained_path:
        raise UsageError(f"two checkpoints given ({args.pretrained_path} and --pretrained {args.pretrained}); "
                         f"pass one")
    args.pretrained = args.pretrained or args.pretrained_path
    if not args.pretrained:
        raise UsageError(f"pass the checkpoint: lomar {args.command} PRETRAINED, or --pretrained PRETRAINED")
    if not (args.data or (args.train and args.val)):
        raise UsageError("pass --data ROOT (with train/ and val/) or both --train and --val")
    for flag, root in (("--data", args.data), ("--train", args.train), ("--val", args.val)):
        if root and not Path(root).is_dir():
            raise UsageError(f"{flag} {root} is not a folder; pass an ImageFolder root")
    check_checkpoint(args.pretrained)  # in the words of lomar export's and predict's, before torch is imported
    outputs = (("--json", args.json, "scores.json"), ("--save", getattr(args, "save", None), "probe.pt"))
    for flag, path, example in outputs:
        _check_not_read(path, flag, args.pretrained)
        # before the features: minutes of extraction must not end in a refusal
        check_output_file(path, flag, overwrite=args.overwrite, create_parents=True, example=example)
    if args.json and getattr(args, "save", None) and Path(args.json).resolve() == Path(args.save).resolve():
        raise UsageError(f"--json and --save both name {args.json}; the probe's weights would be overwritten by the "
                         f"scores: pass two files")


def _extracted(args: argparse.Namespace, with_encoder: bool) -> Frozen | None:
    import torch.distributed as dist

    use_threads(args.threads)
    say = functools.partial(print, f"lomar {args.command}:", file=sys.stderr)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return frozen_features(args, say, with_encoder=with_encoder)
    from lomar.train.distributed import cleanup_distributed, join_group  # torch: not for --help

    info, device = join_group(resolve_device(args.device))  # gloo on the CPU, NCCL on CUDA, as pretrain
    try:
        features = frozen_features(args, say if info.is_main else lambda msg: None, str(device), with_encoder)
        # Leave the group together (gloo aborts a peer torn down mid-gather); the main process then scores with no
        # collective open, which a long probe fit would outlast (NCCL ends one after 10 minutes).
        dist.barrier()
        return features
    finally:
        cleanup_distributed()


def knn_run(args: argparse.Namespace) -> int:
    if (frozen := _features(args)) is None:  # a torchrun process whose share the main one scores
        return 0
    from lomar.eval.knn import knn_top1  # torch: not for --help; after _features, whose checks come first
    train_x, train_y, val_x, val_y = frozen.features
    k = min(args.k, len(train_y))  # knn_top1's own cap, said
    top1 = knn_top1(train_x, train_y, val_x, val_y, k, args.temperature, device=resolve_device(args.device))
    capped = f", every training image: --k {args.k} asks for more" if k < args.k else ""
    print(f"k-NN (k={k}{capped}, T={args.temperature}, {args.pool} features) top-1: {percent_text(100 * top1)}% "
          f"({len(val_y)} val / {len(train_y)} train images)")
    if args.json:
        # the crop size and decode too: a draft decode's pixels, or another size, score differently
        write_json(args.json, {"knn_top1": top1, "k": k, "temperature": args.temperature, "pool": args.pool,
                               "img_size": args.img_size, "decode": args.decode, **frozen.images()})
    _say_written(args)
    return 0


def _say_written(args: argparse.Namespace) -> None:
    """Name the files the command wrote (--json, linprobe's --save), on stderr as its notes are: stdout holds the
    score line alone."""
    written = [f"the probe to {args.save}"] if getattr(args, "save", None) else []
    written += [f"the result to {args.json}"] if args.json else []
    if written:
        print(f"lomar {args.command}: wrote {' and '.join(written)}", file=sys.stderr)


def resolve_linprobe(args: argparse.Namespace) -> None:
    """The protocol's own defaults, as ``lomar linprobe`` and the study both read them: MAE's probes the
    cls token and warms up within its epochs; AdamW's probes the mean of the patch tokens."""
    # A flag of the other protocol is refused: ignored, it would mislead (--protocol mae --weight-decay 0.05
    # would run without it).
    other = "adamw" if args.protocol == "mae" else "mae"
    for name in _PROTOCOL_FLAGS[other]:
        if getattr(args, name) != LINPROBE[name].default:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} is for --protocol {other}; --protocol {args.protocol} does not read it: drop "
                             f"{flag}" + (" (LARS here has no weight decay, as MAE's probe)"
                                          if name == "weight_decay" else ""))
    if args.protocol == "mae":  # only MAE's protocol warms up
        check_warmup(args)
    args.pool = args.pool or ("cls" if args.protocol == "mae" else "mean")


def fit_linprobe(args: argparse.Namespace, features: list):
    """(probe, val top-1) of ``args.protocol`` on ``features`` = (train_x, train_y, val_x, val_y)."""
    from lomar.eval.linear_probe import train_linear_probe, train_mae_linear_probe  # torch: not for --help

    if args.protocol == "mae":
        train, extra = train_mae_linear_probe, dict(blr=args.blr, warmup_epochs=args.warmup_epochs)
    else:
        train, extra = train_linear_probe, dict(lr=args.lr, weight_decay=args.weight_decay)
    return train(*features, epochs=args.epochs, batch_size=args.probe_batch_size, seed=args.seed, **extra)


def linprobe_run(args: argparse.Namespace) -> int:
    # Under torchrun the main process alone fits the probe: a few seconds to minutes on cached features, and one
    # process's fit is the one-process result (a fit shared by DDP would reduce its gradients in another order).
    if (frozen := _features(args, resolve_linprobe, with_encoder=bool(args.save))) is None:  # the main one scores
        return 0
    from lomar.checkpoints.io import atomic_save  # torch: not for --help; after _features, whose checks come first
    from lomar.eval.linear_probe import probe_checkpoint  # torch, as above

    train_y, val_y = frozen.features[1], frozen.features[3]
    try:
        probe, top1 = fit_linprobe(args, frozen.features)
    except ValueError as exc:  # the library's "lower blr (now 100)" is the flag's
        raise UsageError(re.sub(r"lower (b?lr) \(", r"lower --\1 (", str(exc))) from None
    print(f"linear probe ({args.protocol} protocol, {args.pool} features, {args.epochs} epochs) top-1: "
          f"{percent_text(100 * top1)}% ({len(val_y)} val / {len(train_y)} train images)")
    if args.save:
        atomic_save(probe_checkpoint(frozen.encoder, probe, args.pool, frozen.classes, top1, args.img_size,
                                     str(Path(args.pretrained).resolve()), args.decode), args.save)
    if args.json:
        write_json(args.json, {"linprobe_top1": top1, "protocol": args.protocol, "epochs": args.epochs,
                               "lr": args.lr if args.protocol == "adamw" else args.blr * args.probe_batch_size / 256,
                               "pool": args.pool, "img_size": args.img_size, "decode": args.decode,
                               **frozen.images()})
    _say_written(args)
    return 0
