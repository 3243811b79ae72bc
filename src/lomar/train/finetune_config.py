"""The finetuning configuration: the original recipe's defaults (SPEC §3), YAML + flags, validation.

Resolution order, later wins: the recipe → the YAML file (``--config``) → command-line flags.
A resumed run (``--resume``) starts from its saved settings instead; only run-control
settings may change (see ``_RUN_CONTROL``). Everything is checked before any folder is made.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lomar.train.runtime import default_workers
from lomar.train.settings import (
    SCHEDULE_STEPS_HELP,
    ConfigError,
    add_dataclass_arguments,
    coerce_all,
    explicit_values,
    lay_schedule_over_max_steps,
    resume_target,
    resume_values,
)

__all__ = ["FinetuneConfig", "add_finetune_arguments", "resolve_finetune_config", "dump_finetune_config",
           "encoder_layout"]


@dataclass
class FinetuneConfig:
    COMMAND = "finetune"
    METAVARS = {"crop_scale": ("LOW", "HIGH"), "global_blocks": "I"}  # --help names the values of a multi-value flag
    pretrained: str | None = None  # required for a new run; a resume reads it from the checkpoint
    data: str | None = None  # ROOT with train/ and val/
    train: str | None = None
    val: str | None = None
    out: str = "runs/finetune"
    img_size: int = 224
    batch_size: int = 64  # per process
    accum_iter: int = 1  # batches per optimizer step (gradient accumulation)
    global_pool: str = "avg"  # avg: mean patch token -> fc_norm; cls: normed cls token
    epochs: int = 100
    max_steps: int | None = None
    schedule_steps: int | None = None  # None: the epochs' steps (see schedule_span)
    blr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 5
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    drop_path: float = 0.1
    grad_checkpointing: bool = False
    window_size: int | None = None  # ViTDet-style windowed blocks; None = the pretrained encoder's layout
    global_blocks: tuple[int, ...] | None = None  # with window_size: None = ViTDet's (2, 5, 8, 11 of 12)
    attention: str = "auto"  # auto | dense | chunked | flex: how the iRPE bias is computed (same result)
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    reprob: float = 0.25
    aa: str = "rand-m9-mstd0.5-inc1"
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop's area range (timm's default)
    precision: str = "auto"
    workers: int | None = None
    threads: int | None = None
    seed: int = 0
    device: str = "auto"
    log_every: int = 20
    resume: str | None = None
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {"precision": ("auto", "fp32", "bf16"), "global_pool": ("avg", "cls"),
            "attention": ("auto", "dense", "chunked", "flex")}
_HELP = {
    "pretrained": "our pretrain checkpoint or run folder, an exported folder, or an original LoMaR / MAE "
                  "checkpoint (required unless resuming)",
    "data": "ImageFolder root holding train/ and val/",
    "train": "ImageFolder root of the training split (instead of --data)",
    "val": "ImageFolder root of the validation split (instead of --data)",
    "out": "output folder (last.pt, best.pt, metrics.jsonl)",
    "img_size": "may differ from the pretraining size", "batch_size": "images per process per step (even: mixup pairs)",
    "max_steps": "stop after N optimizer steps (smoke runs)",
    "schedule_steps": SCHEDULE_STEPS_HELP,
    "blr": "base lr: lr = blr * effective batch / 256 (batch size x accum iter x processes)",
    "accum_iter": "batches per optimizer step: the effective batch is batch size x accum iter x processes",
    "global_pool": "classifier input: avg = mean of the patch tokens -> fc_norm (the recipe); cls = the "
                   "cls token after the final norm",
    "layer_decay": "lr scale per layer below the top, in (0, 1]", "drop_path": "stochastic depth rate, in [0, 1)",
    "grad_checkpointing": "recompute each block in the backward pass: less memory at high resolution",
    "window_size": "ViTDet-style blocks at high resolution: attend inside N x N patch windows (iRPE inside each) "
                   "except in --global-blocks; 0 = global attention in every block; None = the pretrained "
                   "encoder's layout (global for pretraining checkpoints)",
    "global_blocks": "with --window-size N > 0: the blocks (0-based) that keep global attention; None = ViTDet's, "
                     "the last block of each quarter of the depth (2 5 8 11 for ViT-B)",
    "attention": "how the iRPE bias is computed, same result: auto = dense for short sequences, above that flex on "
                 "CUDA and query chunks elsewhere (see lomar bench --task backbone)",
    "mixup": "mixup alpha (0 = off)", "cutmix": "cutmix alpha (0 = off)", "smoothing": "label smoothing, in [0, 1)",
    "reprob": "random erasing probability, in [0, 1]", "aa": "timm auto-augment policy ('none' = off)",
    "crop_scale": "area range of the training random resized crop, as fractions of the image (0 < LOW <= HIGH "
                  "<= 1); the default is timm's, the original recipe's; raise LOW for small images, e.g. 0.5 1.0",
    "precision": "auto = bf16 autocast on CUDA with bf16 support, else fp32",
    "workers": "data-loading processes; None = min(8, cores - 1)",
    "threads": "CPU threads per process; None = the cores shared among this machine's processes",
    "device": "auto (CUDA if available), cpu, cuda, cuda:N", "log_every": "write the training loss every N steps",
    "resume": "checkpoint path, or 'auto' for the newest state in --out (starts afresh if none)",
    "overwrite": "replace a run already in --out (or rewind it to an older --resume checkpoint)",
}

# What may differ from the saved settings on resume: where and how the run is driven. `epochs`
# may grow (the cosine schedule stretches from there); data and pretrained weights may move.
_RUN_CONTROL = {"pretrained", "data", "train", "val", "out", "resume", "overwrite", "epochs", "max_steps",
                "workers", "threads", "device", "log_every", "attention"}
_PER_INVOCATION = {"resume": None, "overwrite": False, "max_steps": None}  # never inherited
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_MAX_SEED = 2**31 - 1  # the data order and the augmentation streams are seeded with seed + rank


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, FinetuneConfig, _HELP, _CHOICES, nargs_optional={"resume": "auto"})


def resolve_finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """Recipe defaults, YAML, flags (or the resumed run's saved settings) -> a validated config."""
    explicit = explicit_values(FinetuneConfig, args)
    saved = _saved_settings(explicit)
    if saved is not None:
        values = resume_values(FinetuneConfig, *saved, explicit, _RUN_CONTROL, _PER_INVOCATION)
    else:
        values = {**FinetuneConfig().to_dict(), **explicit}
        lay_schedule_over_max_steps(values, explicit)
    config = FinetuneConfig(**values)
    if "warmup_epochs" not in explicit and 0 < config.epochs < config.warmup_epochs:
        # The default warm-up (the recipe's 5 epochs) in a shorter run: warm up over the whole run, saying so.
        print(f"lomar finetune: warming up for all {config.epochs} epoch(s) (the default "
              f"{config.warmup_epochs:g} is longer than --epochs)", file=sys.stderr)
        config.warmup_epochs = float(config.epochs)
    if config.workers is None:
        config.workers = default_workers()
    validate(config, check_out=not getattr(args, "print_config", False))
    return config


def _saved_settings(explicit: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """(settings, where from) of the run being resumed; None for a new run."""
    path = resume_target(explicit)
    if path is None:
        return None
    from lomar.checkpoints.io import safe_load

    try:
        ckpt = safe_load(path, mmap=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: {exc}") from None
    if not {"optimizer", "batches_done", "best_top1"} <= set(ckpt):
        raise ConfigError(f"--resume {path} is not a `lomar finetune` checkpoint; to start from pretrained "
                          f"weights pass them as --pretrained")
    # "args": the settings as runs before FinetuneConfig saved them
    settings = next((ckpt[k] for k in ("settings", "args") if isinstance(ckpt.get(k), dict)), {})
    saved = coerce_all(FinetuneConfig, settings, str(path), strict=False)
    if "out" not in explicit:  # a checkpoint resumes into its own folder unless told otherwise
        saved["out"] = str(path.parent)
    return saved, str(path)


def validate(config: FinetuneConfig, check_out: bool = True) -> None:
    """Everything that can be checked before any work; raises ConfigError naming the fix."""
    def bad(name: str, rule: str) -> ConfigError:
        return ConfigError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(config, name)}")

    for name in ("blr", "min_lr", "warmup_epochs", "layer_decay", "weight_decay", "drop_path", "mixup", "cutmix",
                 "smoothing", "reprob"):
        if not math.isfinite(getattr(config, name)):
            raise bad(name, "a finite number")
    for name in ("batch_size", "accum_iter", "epochs", "img_size", "log_every", "max_steps", "schedule_steps",
                 "threads", "blr"):
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            raise bad(name, "positive")
    for name in ("workers", "min_lr", "weight_decay", "mixup", "cutmix", "seed"):
        if getattr(config, name) < 0:
            raise bad(name, ">= 0")
    for name, low, high, rule in (("drop_path", 0, 1, "in [0, 1)"), ("smoothing", 0, 1, "in [0, 1)")):
        if not low <= getattr(config, name) < high:
            raise bad(name, rule)
    if not 0 <= config.reprob <= 1:
        raise bad("reprob", "a probability in [0, 1]")
    if not 0 < config.layer_decay <= 1:
        raise bad("layer_decay", "in (0, 1]")
    low, high = config.crop_scale
    if not 0 < low <= high <= 1:  # also false for nan; inf fails <= 1
        raise ConfigError(f"--crop-scale must be LOW HIGH with 0 < LOW <= HIGH <= 1 (finite fractions of the image "
                          f"area), got {low:g} {high:g}; e.g. --crop-scale 0.08 1.0 (the recipe) or 0.5 1.0")
    _check_windows(config)
    if config.seed > _MAX_SEED:
        raise bad("seed", f"at most {_MAX_SEED}")
    if not 0 <= config.warmup_epochs <= config.epochs:
        raise ConfigError(f"--warmup-epochs must be in [0, --epochs {config.epochs}], got {config.warmup_epochs}; "
                          f"lower --warmup-epochs or raise --epochs")
    if (config.mixup > 0 or config.cutmix > 0) and config.batch_size % 2:
        raise ConfigError(f"mixup/cutmix pair images: --batch-size must be even, got {config.batch_size}")
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                              f"got {getattr(config, name)!r}")
    if not _DEVICE.match(config.device):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    if not check_out:
        return  # --print-config: the settings only
    _validate_paths(config)
    _validate_augmentation(config)


def _validate_paths(config: FinetuneConfig) -> None:
    from lomar.train.run_state import check_out_folder

    if not (config.data or (config.train and config.val)):
        raise ConfigError("pass --data ROOT (with train/ and val/) or both --train and --val")
    for split in split_roots(config):
        if not split.is_dir():
            raise ConfigError(f"{split} is not a folder; finetuning needs ImageFolder class folders "
                              f"(ROOT/train/CLASS/IMAGE and ROOT/val/CLASS/IMAGE)")
    if config.pretrained is None:
        raise ConfigError("pass --pretrained CHECKPOINT (the encoder to finetune)")
    if not Path(config.pretrained).exists():
        raise ConfigError(f"--pretrained {config.pretrained} does not exist")
    out = Path(config.out)
    try:
        check_out_folder(out)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 may already have started
    if (out / "last.pt").exists() and is_main and not config.resume and not config.overwrite:
        raise ConfigError(f"--out {out} already holds a run; pass --resume auto to continue it, "
                          f"--overwrite to replace it, or another --out")


def encoder_layout(config: FinetuneConfig) -> dict:
    """The attention settings the finetuned encoder overrides (none: the pretrained encoder's)."""
    layout = {} if config.attention == "auto" else {"attention": config.attention}
    if config.window_size is not None:
        layout["window_size"] = config.window_size
        layout["global_blocks"] = () if not config.window_size else config.global_blocks  # None: ViTDet's
    return layout


def _check_windows(config: FinetuneConfig) -> None:
    """--window-size / --global-blocks (the block indices are checked against the depth at load)."""
    if config.window_size is not None and config.window_size < 0:
        raise ConfigError(f"--window-size must be >= 0 (0 = global attention in every block), got {config.window_size}")
    blocks = config.global_blocks
    if blocks is None:
        return
    if not config.window_size:
        raise ConfigError("--global-blocks needs --window-size N > 0 (the other blocks attend inside N x N windows); "
                          "add --window-size 14, or drop --global-blocks")
    if any(i < 0 for i in blocks) or len(set(blocks)) != len(blocks):
        raise ConfigError(f"--global-blocks must be distinct block indices >= 0, got {' '.join(map(str, blocks))}")


def _validate_augmentation(config: FinetuneConfig) -> None:
    """Build the policy now: a typo would otherwise surface as a cryptic error at the first image."""
    if config.aa == "none":
        return
    from lomar.train.finetune import classification_transforms

    try:
        classification_transforms(config.img_size, config.aa, config.reprob, config.crop_scale)
    except Exception as exc:  # timm reports an unknown policy with an AssertionError / KeyError
        raise ConfigError(f"--aa {config.aa!r} is not a timm auto-augment policy ({exc}); e.g. "
                          f"rand-m9-mstd0.5-inc1, augmix-m5, original, or none") from None


def split_roots(config: FinetuneConfig) -> tuple[Path, Path]:
    """(train, val) ImageFolder roots."""
    train = Path(config.train) if config.train else Path(config.data) / "train"
    val = Path(config.val) if config.val else Path(config.data) / "val"
    return train, val


def dump_finetune_config(config: FinetuneConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
