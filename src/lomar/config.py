"""The pretraining configuration: recipe defaults, demo preset, YAML + flags, validation.

Resolution order, later wins: the original recipe (SPEC §4) → the demo preset (only when
no ``--data`` is given) → the YAML file (``--config``) → command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .masking import check_window_request, grid_size
from .vit import ViTConfig, model_config

__all__ = ["PretrainConfig", "DEMO_PRESET", "add_config_arguments", "resolve_config", "build_model",
           "vit_config", "ConfigError"]


class ConfigError(ValueError):
    """A configuration that cannot run; the CLI turns it into a one-line error and exit code 2."""


@dataclass
class PretrainConfig:
    # data and output
    data: str | None = None  # image folder, .txt list, or tar shard pattern; None = demo photos
    out: str | None = None  # default runs/<timestamp>
    # method and model
    method: str = "lomar"  # lomar | mae
    model: str = "vit_base_patch16"
    embed_dim: int | None = None  # explicit widths override the named model
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    img_size: int = 224
    pos: str | None = None  # rpe | abs; default rpe for lomar, abs for mae
    window_size: int = 7
    windows: int = 4  # per image; the paper uses 4 at 224, 6 at 384, 9 at 448
    mask_ratio: float | None = None  # default 0.8 for lomar, 0.75 for mae
    norm_pix_loss: bool = True
    decoder_embed_dim: int = 512  # MAE only
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    # optimisation (original recipe)
    batch_size: int = 64  # per device
    accum_steps: int = 1
    epochs: int = 400
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    blr: float = 1.5e-4  # lr = blr * effective_batch / 256
    lr: float | None = None  # absolute lr, overrides blr
    min_lr: float = 0.0
    warmup_epochs: float = 40
    weight_decay: float = 0.05
    clip_grad: float | None = None
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto = bf16 on capable CUDA, else fp32
    compile: bool = False
    # running
    workers: int = 8
    threads: int | None = None  # torch CPU threads per process; None = torch's default
    seed: int = 0
    device: str = "auto"
    save_every: int = 20  # epochs
    keep_last: int = 2
    log_every: int = 20  # optimizer steps
    resume: str | None = None  # PATH or 'auto'
    overwrite: bool = False
    figure_images: int = 4
    knn_every: int = 0  # epochs; 0 = never
    knn_data: str | None = None  # ImageFolder root with train/ and val/, for --knn-every

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# A tiny model on small crops of the bundled photographs: finishes in a few minutes on 2 CPU cores.
DEMO_PRESET: dict[str, Any] = dict(
    model="vit_small_patch8", embed_dim=128, depth=4, num_heads=4, img_size=96, windows=4,
    batch_size=16, epochs=4, lr=1e-3, warmup_epochs=1, save_every=2, workers=1, threads=1, log_every=5,
    device="cpu",
)

_CHOICES = {"method": ("lomar", "mae"), "pos": ("rpe", "abs", "none"),
            "precision": ("auto", "fp32", "bf16", "fp16")}
_HELP = {
    "data": "image folder (recursive), .txt list of paths, or tar shards ('shards/*.tar', "
            "'shard-{000..009}.tar'); omit for the built-in demo photographs",
    "out": "output folder (default runs/<timestamp>)", "windows": "windows per image",
    "resume": "checkpoint path, or 'auto' for OUT/last.pt", "max_steps": "stop after N optimizer steps",
    "batch_size": "images per device per step", "blr": "base lr: lr = blr * effective batch / 256",
    "save_every": "write a checkpoint every N epochs",
    "knn_every": "every N epochs, print and log the k-NN top-1 of the encoder on --knn-data (0 = never)",
    "knn_data": "ImageFolder root with train/ and val/ class folders, for --knn-every",
    "threads": "CPU threads per process (1 is fastest for tiny models on a busy machine)", "keep_last": "checkpoints to keep",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (``--window-size`` for ``window_size``), plus --config."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the settings below")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for field in fields(PretrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = field.type if isinstance(field.type, str) else field.type.__name__
        common = dict(default=argparse.SUPPRESS, help=_HELP.get(field.name), dest=field.name)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            continue
        base = kind.split(" | ")[0]
        convert = {"int": int, "float": float, "str": str}[base]
        if field.name == "resume":  # a bare --resume means --resume auto
            common.update(nargs="?", const="auto", metavar="PATH|auto")
        parser.add_argument(flag, type=convert, choices=_CHOICES.get(field.name), **common)


def resolve_config(args: argparse.Namespace) -> PretrainConfig:
    """Recipe defaults, demo preset, YAML, flags -> a validated PretrainConfig."""
    known = {f.name for f in fields(PretrainConfig)}
    from_yaml: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            from_yaml = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(from_yaml, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
        from_yaml = {k.replace("-", "_"): v for k, v in from_yaml.items()}
        unknown = sorted(set(from_yaml) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in {path}; "
                              f"see `lomar pretrain --help` for the valid ones")
    from_flags = {k: v for k, v in vars(args).items() if k in known}
    data = from_flags.get("data", from_yaml.get("data"))
    values = PretrainConfig().to_dict()
    if data is None:
        preset = dict(DEMO_PRESET)
        if "model" in from_yaml or "model" in from_flags:  # a named model brings its own widths
            for key in ("embed_dim", "depth", "num_heads"):
                preset.pop(key)
        values.update(preset)
    values.update(from_yaml)
    values.update(from_flags)
    config = PretrainConfig(**values)
    if config.out is None:
        config.out = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if config.mask_ratio is None:
        config.mask_ratio = 0.8 if config.method == "lomar" else 0.75
    if config.pos is None:
        config.pos = "rpe" if config.method == "lomar" else "abs"
    validate(config)
    return config


def vit_config(config: PretrainConfig) -> ViTConfig:
    overrides = {k: getattr(config, k) for k in ("embed_dim", "depth", "num_heads", "patch_size")
                 if getattr(config, k) is not None}
    try:
        return model_config(config.model, img_size=config.img_size, pos=config.pos, **overrides)
    except ValueError as exc:
        raise ConfigError(f"--model: {exc}") from None


def validate(config: PretrainConfig) -> None:
    """Everything that can be checked before any work; raises ConfigError naming the fix."""
    for name in ("batch_size", "accum_steps", "epochs", "save_every", "keep_last", "log_every"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.max_steps is not None and config.max_steps <= 0:
        raise ConfigError(f"--max-steps must be positive, got {config.max_steps}")
    if config.threads is not None and config.threads <= 0:
        raise ConfigError(f"--threads must be positive, got {config.threads}")
    if config.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {config.workers}")
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got {getattr(config, name)!r}")
    if config.method == "mae" and config.pos != "abs":
        raise ConfigError(f"--method mae needs --pos abs (got {config.pos})")
    vit = vit_config(config)
    if vit.embed_dim % vit.num_heads:
        raise ConfigError(f"--embed-dim {vit.embed_dim} is not divisible by --num-heads {vit.num_heads}")
    try:
        grid = grid_size(config.img_size, vit.patch_size)
        if config.method == "lomar":
            check_window_request(grid, config.window_size, config.windows, config.mask_ratio)
        elif not 0 < config.mask_ratio < 1:
            raise ValueError(f"--mask-ratio must be in (0, 1) for MAE, got {config.mask_ratio}")
    except ValueError as exc:
        raise ConfigError(f"at --img-size {config.img_size}: {exc}") from None
    if config.data is not None and "*" not in config.data and "{" not in config.data \
            and not Path(config.data).exists():
        raise ConfigError(f"--data {config.data} does not exist; pass a folder of images, a .txt list "
                          f"or a tar shard pattern, or omit --data for the demo")
    out = Path(config.out)
    holds_run = (out / "last.pt").exists() or (out / "config.yaml").exists()
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 may already have started
    if holds_run and is_main and not config.resume and not config.overwrite:
        raise ConfigError(f"--out {out} already holds a run; pass --resume auto to continue it, "
                          f"--overwrite to replace it, or another --out")
    if config.knn_every < 0:
        raise ConfigError(f"--knn-every must be >= 0, got {config.knn_every}")
    if config.knn_every and not (config.knn_data and (Path(config.knn_data) / "train").is_dir()
                                 and (Path(config.knn_data) / "val").is_dir()):
        raise ConfigError(f"--knn-every needs --knn-data ROOT holding train/ and val/ class folders, "
                          f"got {config.knn_data!r}")
    if config.resume and config.resume != "auto" and not Path(config.resume).is_file():
        raise ConfigError(f"--resume {config.resume} does not exist; pass a checkpoint file or 'auto'")


def build_model(config: PretrainConfig):
    """The LoMaR or MAE model the config describes."""
    from .methods import MAE, LoMaR

    vit = vit_config(config)
    if config.method == "lomar":
        return LoMaR(vit, config.window_size, config.windows, config.mask_ratio, config.norm_pix_loss)
    return MAE(vit, config.decoder_embed_dim, config.decoder_depth, config.decoder_num_heads,
               config.mask_ratio, config.norm_pix_loss)


def dump_config(config: PretrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
