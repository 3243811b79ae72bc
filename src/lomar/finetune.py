"""``lomar finetune``: end-to-end classification finetuning, the original recipe (SPEC §3).

timm supplies the recipe's pieces: RandAugment / random erasing transforms, Mixup/CutMix
with label smoothing, SoftTargetCrossEntropy and layer-wise lr decay parameter groups.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import atomic_save, safe_load
from .cli import UsageError
from .data import IMAGENET_MEAN, IMAGENET_STD
from .distributed import cleanup_distributed, init_distributed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrained", required=True, help="our checkpoint, an exported folder or an original checkpoint")
    p.add_argument("--data", help="ImageFolder root holding train/ and val/")
    p.add_argument("--train", help="ImageFolder root of the training split (instead of --data)")
    p.add_argument("--val", help="ImageFolder root of the validation split (instead of --data)")
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64, help="per device")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (smoke runs)")
    p.add_argument("--blr", type=float, default=5e-4)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--warmup-epochs", type=float, default=5)
    p.add_argument("--layer-decay", type=float, default=0.65)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.8)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    p.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", help="checkpoint path or 'auto' (OUT/last.pt)")


def _splits(args) -> tuple[Path, Path]:
    train = Path(args.train) if args.train else Path(args.data or "") / "train"
    val = Path(args.val) if args.val else Path(args.data or "") / "val"
    if not (args.data or (args.train and args.val)):
        raise UsageError("pass --data ROOT (with train/ and val/) or both --train and --val")
    for split in (train, val):
        if not split.is_dir():
            raise UsageError(f"{split} is not a folder; finetuning needs ImageFolder train/ and val/ class folders")
    return train, val


def _loaders(args, train_root: Path, val_root: Path, info):
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    train_tf = create_transform(args.img_size, is_training=True, auto_augment=args.aa, re_prob=args.reprob,
                                re_mode="pixel", re_count=1, interpolation="bicubic",
                                mean=IMAGENET_MEAN, std=IMAGENET_STD)
    val_tf = create_transform(args.img_size, is_training=False, interpolation="bicubic", crop_pct=0.875,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train_set, val_set = ImageFolder(str(train_root), train_tf), ImageFolder(str(val_root), val_tf)
    if train_set.classes != val_set.classes:
        raise UsageError(f"train and val class folders differ: {train_set.classes} vs {val_set.classes}")
    sampler = DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    val_sampler = DistributedSampler(val_set, info.world_size, info.rank, shuffle=False)
    common = dict(num_workers=args.workers, persistent_workers=args.workers > 0)
    train = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True, **common)
    val = DataLoader(val_set, args.batch_size, sampler=val_sampler, **common)
    return train, val, len(train_set.classes)


@torch.no_grad()
def evaluate(model, loader, device, info) -> dict[str, float]:
    """Top-1 / top-5 accuracy in [0, 1] over the whole (sharded) validation set."""
    model.eval()
    totals = torch.zeros(3, device=device)  # correct@1, correct@5, count
    for images, targets in loader:
        logits = model(images.to(device))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        hit = top == targets[:, None]
        totals += torch.tensor([hit[:, 0].sum(), hit.any(1).sum(), len(targets)], device=device, dtype=torch.float)
    if info.enabled:
        dist.all_reduce(totals)
    model.train()
    return {"top1": float(totals[0] / totals[2]), "top5": float(totals[1] / totals[2])}


def run(args: argparse.Namespace) -> int:
    if args.batch_size <= 0 or args.epochs <= 0:
        raise UsageError(f"--batch-size and --epochs must be positive, got {args.batch_size} and {args.epochs}")
    if not Path(args.pretrained).exists():
        raise UsageError(f"--pretrained {args.pretrained} does not exist")
    train_root, val_root = _splits(args)
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay

    from .evaluate import load_pretrained_encoder
    from .vit import VisionTransformer

    info, device = init_distributed(args.device)
    try:
        torch.manual_seed(args.seed)
        train_loader, val_loader, classes = _loaders(args, train_root, val_root, info)
        try:
            encoder = load_pretrained_encoder(args.pretrained)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        # Rebuild at the finetuning size with drop path and a fresh head; the weights carry over
        # (RPE is resolution-free; absolute tables are interpolated by pos_embed_for).
        config = type(encoder.config)(**{**encoder.config.to_dict(), "drop_path": args.drop_path})
        model = VisionTransformer(config, num_classes=classes)
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
        model.load_state_dict(state, strict=False)
        model.to(device)
        out = Path(args.out)
        effective = args.batch_size * info.world_size
        base_lr = args.blr * effective / 256
        groups = param_groups_layer_decay(model, args.weight_decay, model.no_weight_decay(),
                                          layer_decay=args.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=base_lr)
        mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                          num_classes=classes)
            criterion = SoftTargetCrossEntropy()
        else:
            criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else torch.nn.CrossEntropyLoss()
        net = DistributedDataParallel(model) if info.enabled else model
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise UsageError(f"the training split has fewer images than one batch of {args.batch_size}")
        start_epoch, step, best = 0, 0, 0.0
        resume = out / "last.pt" if args.resume == "auto" else Path(args.resume) if args.resume else None
        if resume is not None and resume.exists():
            ckpt = safe_load(resume, map_location=device)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch, step, best = ckpt["epoch"], ckpt["step"], ckpt["best_top1"]
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
        log = open(out / "metrics.jsonl", "a") if info.is_main else None
        total = args.epochs * steps_per_epoch
        for epoch in range(start_epoch, args.epochs):
            train_loader.sampler.set_epoch(epoch)
            tick = time.perf_counter()
            for images, targets in train_loader:
                progress = step / steps_per_epoch
                if progress < args.warmup_epochs:
                    lr = base_lr * progress / args.warmup_epochs
                else:
                    frac = (step - args.warmup_epochs * steps_per_epoch) / max(1, total - args.warmup_epochs * steps_per_epoch)
                    lr = args.min_lr + (base_lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                images, targets = images.to(device), targets.to(device)
                if mixup is not None:
                    images, targets = mixup(images, targets)
                loss = criterion(net(images), targets)
                if not math.isfinite(float(loss)):
                    raise RuntimeError(f"loss is {float(loss)} at step {step}; lower --blr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if log:
                    log.write(json.dumps({"step": step, "epoch": epoch, "loss": float(loss), "lr": lr}) + "\n")
                if args.max_steps and step >= args.max_steps:
                    break
            metrics = evaluate(net, val_loader, device, info)
            if info.is_main:
                is_best = metrics["top1"] >= best
                best = max(best, metrics["top1"])
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                         "step": step, "best_top1": best, "config": model.config.to_dict(),
                         "num_classes": classes, "classes": train_loader.dataset.classes}
                atomic_save(state, out / "last.pt")
                if is_best:
                    atomic_save({k: state[k] for k in ("model", "config", "num_classes", "classes", "epoch")},
                                out / "best.pt")
                log.write(json.dumps({"epoch": epoch, "step": step, **metrics, "best_top1": best,
                                      "epoch_s": round(time.perf_counter() - tick, 2)}) + "\n")
                log.flush()
                print(f"epoch {epoch}: top-1 {100 * metrics['top1']:.2f}% top-5 {100 * metrics['top5']:.2f}% "
                      f"(best {100 * best:.2f}%)", flush=True)
            if args.max_steps and step >= args.max_steps:
                break
        if log:
            log.close()
        return 0
    except RuntimeError as exc:
        print(f"lomar finetune: error: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup_distributed()
