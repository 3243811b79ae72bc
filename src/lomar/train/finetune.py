"""``lomar finetune``: end-to-end classification finetuning with the original recipe (SPEC §3).

timm supplies the recipe's pieces: the RandAugment / random-erasing transform
(``create_transform``), Mixup/CutMix with label smoothing (``Mixup``), the soft-target loss
and the layer-wise lr decay parameter groups (``param_groups_layer_decay``, driven by
``VisionTransformer.group_matcher``: stem = layer 0, block i = layer i+1, final norm and head
= top layer, scaled decay^(top − layer)). The lr follows ``lomar.train.schedule.lr_at`` per
iteration: linear warm-up, cosine to ``--min-lr``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from lomar.checkpoints.io import atomic_save, safe_load
from lomar.errors import UsageError
from lomar.data.images import IMAGENET_MEAN, IMAGENET_STD
from lomar.train.distributed import cleanup_distributed, init_distributed
from lomar.train.preemption import StopFlag, any_rank_stopping, ignore_stop_signals, shut_down_workers
from lomar.train.runtime import fast_adamw
from lomar.train.schedule import lr_at


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = "Multi-GPU: torchrun --nproc_per_node G -m lomar finetune ... (--batch-size is per process)."
    p.add_argument("--pretrained", required=True, help="our pretrain checkpoint or run folder, an exported "
                                                       "folder, or an original LoMaR / MAE checkpoint")
    p.add_argument("--data", help="ImageFolder root holding train/ and val/")
    p.add_argument("--train", help="ImageFolder root of the training split (instead of --data)")
    p.add_argument("--val", help="ImageFolder root of the validation split (instead of --data)")
    p.add_argument("--out", default="runs/finetune", help="output folder (last.pt, best.pt, metrics.jsonl)")
    p.add_argument("--img-size", type=int, default=224, help="may differ from the pretraining size")
    p.add_argument("--batch-size", type=int, default=64, help="images per process per step (even: mixup pairs)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (smoke runs)")
    p.add_argument("--blr", type=float, default=5e-4, help="base lr: lr = blr * total batch / 256")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--warmup-epochs", type=float, default=5)
    p.add_argument("--layer-decay", type=float, default=0.65)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block in the backward pass: less memory at high --img-size (default: off)")
    p.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0 = off)")
    p.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0 = off)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    p.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy ('none' = off)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto = bf16 autocast on CUDA with bf16 support, else fp32")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--log-every", type=int, default=20, help="write the training loss every N steps")
    p.add_argument("--resume", help="checkpoint path, or 'auto' for OUT/last.pt (starts afresh if absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")


def _check(args: argparse.Namespace) -> tuple[Path, Path]:
    """Every flag that can be judged before any work; returns the (train, val) roots."""
    for name in ("batch_size", "epochs", "img_size", "log_every"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise UsageError(f"--max-steps must be positive, got {args.max_steps}")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UsageError(f"mixup/cutmix pair images: --batch-size must be even, got {args.batch_size}")
    if not 0 < args.layer_decay <= 1:
        raise UsageError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume} does not exist; pass a checkpoint file or 'auto'")
    if not (args.data or (args.train and args.val)):
        raise UsageError("pass --data ROOT (with train/ and val/) or both --train and --val")
    train = Path(args.train) if args.train else Path(args.data) / "train"
    val = Path(args.val) if args.val else Path(args.data) / "val"
    for split in (train, val):
        if not split.is_dir():
            raise UsageError(f"{split} is not a folder; finetuning needs ImageFolder class folders "
                             f"(ROOT/train/CLASS/IMAGE and ROOT/val/CLASS/IMAGE)")
    if not Path(args.pretrained).exists():
        raise UsageError(f"--pretrained {args.pretrained} does not exist")
    out = Path(args.out)
    if (out / "last.pt").exists() and not args.resume and not args.overwrite:
        raise UsageError(f"--out {out} already holds a run; pass --resume auto to continue it, "
                         f"--overwrite to replace it, or another --out")
    return train, val


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (``skip`` of this rank's items)."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def _posterize_any_bits(img, bits_to_keep, **_):
    """timm's posterize, also for ``bits_to_keep <= 0`` (every bit dropped: a black image).

    RandAugment's ``PosterizeIncreasing`` asks for 0 bits whenever the noisy magnitude
    (``mstd0.5``) reaches 10; Pillow 13 refuses ``ImageOps.posterize(img, 0)`` where older
    Pillow returned the black image the recipe was tuned with.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def classification_transforms(img_size: int, aa: str = "rand-m9-mstd0.5-inc1", reprob: float = 0.25):
    """(train, eval) transforms of the finetune recipe: timm's RandAugment + random erasing,
    bicubic resize, centre crop 0.875 for evaluation. The train transform's posterize ops are
    the guarded ones above, so every RandAugment policy works with every Pillow we allow."""
    from timm.data import create_transform
    from timm.data.auto_augment import AugmentOp

    train_tf = create_transform(img_size, is_training=True, color_jitter=None,
                                auto_augment=None if aa == "none" else aa, interpolation="bicubic",
                                re_prob=reprob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for t in getattr(train_tf, "transforms", ()):
        for op in getattr(t, "ops", ()):
            if isinstance(op, AugmentOp) and op.name.startswith("Posterize"):
                op.aug_fn = _posterize_any_bits
    val_tf = create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=0.875,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return train_tf, val_tf


def _loaders(args, train_root: Path, val_root: Path, info) -> tuple[DataLoader, DataLoader, list[str]]:
    from torchvision.datasets import ImageFolder

    train_tf, val_tf = classification_transforms(args.img_size, args.aa, args.reprob)
    train_set, val_set = ImageFolder(str(train_root), train_tf), ImageFolder(str(val_root), val_tf)
    if train_set.classes != val_set.classes:
        raise UsageError(f"train and val class folders differ: {train_set.classes} vs {val_set.classes}")
    sampler = ResumableSampler(train_set, info.world_size, info.rank, shuffle=True, seed=args.seed, drop_last=True)
    # Each rank scores a disjoint slice of val (no padding duplicates), counts are summed.
    val_part = Subset(val_set, range(info.rank, len(val_set), info.world_size))
    common = dict(num_workers=args.workers, persistent_workers=args.workers > 0,
                  worker_init_fn=ignore_stop_signals if args.workers > 0 else None)
    train = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True, **common)
    val = DataLoader(val_part, args.batch_size, **common)
    if len(train) == 0:
        raise UsageError(f"the training split ({len(train_set)} images over {info.world_size} process(es)) "
                         f"cannot fill one batch of {args.batch_size}; lower --batch-size")
    return train, val, train_set.classes


@torch.no_grad()
def evaluate(model, loader, device: torch.device, info, autocast) -> dict[str, float]:
    """Top-1 / top-5 accuracy in [0, 1] over the whole validation set (all ranks)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, count
    for images, targets in loader:
        with autocast():
            logits = model(images.to(device))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == targets.to(device)[:, None]
        totals += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(targets), device=device)])
    if info.enabled:
        dist.all_reduce(totals)
    model.train(was_training)
    count = max(float(totals[2]), 1.0)
    return {"top1": float(totals[0]) / count, "top5": float(totals[1]) / count}


def _autocast(args, device: torch.device):
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"
                                         and torch.cuda.is_bf16_supported())
    if bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _log_lines_upto(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    train_root, val_root = _check(args)
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay
    from torch.nn.parallel import DistributedDataParallel

    from lomar.eval.evaluate import load_pretrained_encoder

    try:
        info, device = init_distributed(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    stop, loaders = StopFlag(), []
    try:
        # Per-rank streams for augmentation and mixup (timm draws from numpy / random); DDP
        # broadcasts rank 0's initial weights, so the new head is the same everywhere.
        torch.manual_seed(args.seed + info.rank)
        np.random.seed(args.seed + info.rank)
        random.seed(args.seed + info.rank)
        train_loader, val_loader, classes = _loaders(args, train_root, val_root, info)
        loaders = [train_loader, val_loader]
        try:
            model = load_pretrained_encoder(args.pretrained, num_classes=len(classes), img_size=args.img_size,
                                            drop_path=args.drop_path)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if info.is_main:
            print(f"lomar finetune: {model.load_report.summary()}", flush=True)
        model.set_grad_checkpointing(args.grad_checkpointing)
        model.to(device)
        out = Path(args.out)
        base_lr = args.blr * args.batch_size * info.world_size / 256
        groups = param_groups_layer_decay(model, args.weight_decay, model.no_weight_decay(),
                                          layer_decay=args.layer_decay)
        optimizer = fast_adamw(groups, lr=base_lr)
        mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                          num_classes=len(classes))
            criterion = SoftTargetCrossEntropy()  # mixup already smoothed the targets
        elif args.smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(args.smoothing)
        else:
            criterion = torch.nn.CrossEntropyLoss()
        net = DistributedDataParallel(model) if info.enabled else model
        autocast = _autocast(args, device)
        steps_per_epoch = len(train_loader)
        epoch, skip, step, best = 0, 0, 0, 0.0
        resume = out / "last.pt" if args.resume == "auto" else Path(args.resume) if args.resume else None
        if resume is not None and resume.exists():
            try:
                ckpt = safe_load(resume, map_location=device)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            if not {"optimizer", "batches_done", "best_top1"} <= set(ckpt):
                raise UsageError(f"--resume {resume} is not a `lomar finetune` checkpoint; to start from "
                                 f"pretrained weights pass them as --pretrained")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            epoch, skip, step, best = ckpt["epoch"], ckpt["batches_done"], ckpt["step"], ckpt["best_top1"]
            if info.is_main:
                _log_lines_upto(out / "metrics.jsonl", step)
                print(f"lomar finetune: resumed from {resume} at step {step} (epoch {epoch})", flush=True)
        elif info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            for stale in ("last.pt", "best.pt", "metrics.jsonl"):
                (out / stale).unlink(missing_ok=True)
        log = open(out / "metrics.jsonl", "a") if info.is_main else None

        def save(epoch_: int, batches_done: int, metrics: dict | None) -> None:
            nonlocal best
            if not info.is_main:
                return
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch_,
                     "batches_done": batches_done, "step": step, "best_top1": best,
                     "config": model.config.to_dict(), "num_classes": len(classes), "classes": classes,
                     "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                     "format": "lomar-finetune-1"}
            if metrics is not None and metrics["top1"] >= best:
                best = state["best_top1"] = metrics["top1"]
                atomic_save({k: state[k] for k in ("model", "config", "num_classes", "classes", "epoch",
                                                   "step", "format")} | {"metrics": metrics}, out / "best.pt")
            atomic_save(state, out / "last.pt")

        stopped = preempted = False
        stop.install()
        while epoch < args.epochs and not stopped:
            train_loader.sampler.set_epoch(epoch)
            train_loader.sampler.skip = skip * args.batch_size
            tick = time.perf_counter()
            for batch_index, (images, targets) in enumerate(train_loader, start=skip):
                lr = lr_at(step, steps_per_epoch, base_lr, args.warmup_epochs, args.epochs, args.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if mixup is not None:
                    images, targets = mixup(images, targets)
                with autocast():
                    loss = criterion(net(images), targets)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise RuntimeError(f"loss is {value} at step {step}; the last good checkpoint is "
                                       f"{out / 'last.pt'}; lower --blr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if log and (step % args.log_every == 0 or step == 1):
                    log.write(json.dumps({"step": step, "epoch": epoch, "loss": value, "lr": lr}) + "\n")
                if any_rank_stopping(stop, device):
                    # Checkpoint where we are and leave; a resume re-enters this epoch (and evaluates
                    # it if it was complete), so no time goes to evaluation now.
                    stopped = preempted = True
                    skip = batch_index + 1
                    break
                if args.max_steps and step >= args.max_steps:
                    stopped = batch_index + 1 < steps_per_epoch  # a part-done epoch: resume inside it
                    skip = batch_index + 1
                    break
            else:
                skip = steps_per_epoch
            if preempted:
                save(epoch, skip, None)
                break
            if stopped:
                metrics = evaluate(model, val_loader, device, info, autocast)
                save(epoch, skip, None)  # not a finished epoch: never "best"
            else:
                metrics = evaluate(model, val_loader, device, info, autocast)
                epoch, skip = epoch + 1, 0
                save(epoch, 0, metrics)
            if info.is_main:
                log.write(json.dumps({"epoch": epoch - (not stopped), "step": step, **metrics, "best_top1": best,
                                      "epoch_s": round(time.perf_counter() - tick, 2)}) + "\n")
                log.flush()
                print(f"epoch {epoch - (not stopped)} step {step}: top-1 {100 * metrics['top1']:.2f}% "
                      f"top-5 {100 * metrics['top5']:.2f}% (best {100 * best:.2f}%)", flush=True)
            if args.max_steps and step >= args.max_steps:
                break
        if log:
            log.close()
        if info.is_main and preempted:
            print(f"lomar finetune: stopped by {stop.name} at step {step}; checkpoint {out / 'last.pt'}. Resume "
                  f"with the same command plus --resume auto", flush=True)
        elif info.is_main:
            best_path = out / "best.pt"
            print(f"lomar finetune: done at step {step}; " + (
                f"best top-1 {100 * best:.2f}%, {best_path}" if best_path.exists()
                else f"no full epoch evaluated yet, so no best.pt; checkpoint {out / 'last.pt'}"))
        return 0
    except RuntimeError as exc:
        print(f"lomar finetune: error: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.restore()
        shut_down_workers(*loaders)
        cleanup_distributed()
