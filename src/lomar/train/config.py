"""The pretraining configuration: recipe defaults, demo preset, YAML + flags, validation.

Resolution order, later wins: the original recipe (SPEC §4) → the demo preset (only when
no ``--data`` is given) → the YAML file (``--config``) → command-line flags. A resumed run
(``--resume``) starts from its saved config instead, and only run-control settings may change.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lomar.methods import names as method_names
from lomar.train.config_checks import check_data, check_decode, check_fsdp, check_numbers
from lomar.train.runtime import default_workers
from lomar.train.settings import (
    SCHEDULE_STEPS_HELP,
    ConfigError,
    add_dataclass_arguments,
    coerce_all,
    explicit_values,
    lay_schedule_over_max_steps,
    read_yaml,
    resume_target,
    resume_values,
)

if TYPE_CHECKING:
    from lomar.models.vit import ViTConfig

__all__ = ["PretrainConfig", "DEMO_PRESET", "add_config_arguments", "resolve_config", "build_model",
           "vit_config", "ConfigError"]


@dataclass
class PretrainConfig:
    COMMAND = "pretrain"
    PARSERS = {"windows": lambda text: _parse_windows(text)}  # flag / YAML text -> value
    # data and output
    data: str | None = None  # image folder, .txt list, or tar shard pattern; None = demo photos
    out: str | None = None  # default runs/<timestamp>
    # method and model
    method: str = "lomar"  # lomar | mae | beit (lomar.methods)
    model: str = "vit_base_patch16"
    embed_dim: int | None = None  # explicit widths override the named model
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    img_size: int = 224
    pos: str | None = None  # rpe | abs; default rpe for lomar, abs for mae
    window_size: int = 7
    windows: str = "auto"  # a count, 0/'global' = the whole image, auto = the method's default; an int once resolved
    mask_ratio: float | None = None  # default 0.8 for lomar, 0.75 for mae
    norm_pix_loss: bool = True
    decoder_embed_dim: int = 512  # MAE only
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    tokenizer: str | None = None  # BEiT only: dVAE / k-means file; None = fit k-means into OUT
    # optimisation (original recipe)
    batch_size: int = 64  # per device
    accum_steps: int = 1
    epochs: int = 400
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    schedule_steps: int | None = None  # None: the epochs' steps (see schedule_span)
    blr: float = 1.5e-4  # lr = blr * effective_batch / 256
    lr: float | None = None  # absolute lr, overrides blr
    min_lr: float = 0.0
    warmup_epochs: float = 40
    weight_decay: float = 0.05
    clip_grad: float | None = None
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto = bf16 on capable CUDA, else fp32
    compile: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state across torchrun processes (FSDP2)
    decode: str = "full"  # full | draft | windows | gpu (lomar.data.fast_decode, lomar.data.device_decode)
    # running
    workers: int | None = None  # None = min(8, cores - 1)
    threads: int | None = None  # torch CPU threads per process; None = the cores / processes on this machine
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


# A tiny model on 96 px crops of the 15 bundled photographs (120 crops an epoch, 7 steps of 16,
# 3 windows per image by --windows auto): ~0.17 s a step, so 672 steps train for about 2 minutes
# on an idle 2-core machine (the data worker takes the other core), long enough for the
# reconstructions to turn from coloured noise into the images' shapes. Figures at steps 0, 224,
# 448 and 672.
DEMO_PRESET: dict[str, Any] = dict(
    model="vit_small_patch8", embed_dim=128, depth=4, num_heads=4, img_size=96,
    batch_size=16, epochs=96, lr=1e-3, warmup_epochs=5, save_every=32, workers=1, threads=1, log_every=50,
    device="cpu",
)

_CHOICES = {"method": method_names(), "pos": ("rpe", "abs", "none"),
            "precision": ("auto", "fp32", "bf16", "fp16"), "decode": ("full", "draft", "windows", "gpu")}
_HELP = {
    "data": "image folder (recursive), .txt list of paths, or tar shards ('shards/*.tar', "
            "'shard-{000..009}.tar'); omit for the built-in demo photographs",
    "out": "output folder (default runs/<timestamp>)",
    "windows": "K x K windows per image for any method; 0 or 'global' = the whole image; auto = lomar: the "
               "paper's 4 at 224 px, 6 at 384, 9 at 448, scaled with the patch-grid area at other sizes "
               "(--print-config shows the count); mae, beit: global",
    "tokenizer": "--method beit: dVAE (encoder.pkl, state dict, safetensors) or k-means tokenizer file; "
                 "default: fit the built-in k-means tokenizer on the data into OUT/tokenizer.safetensors",
    "mask_ratio": "masked share per window (default 0.8 lomar, 0.75 mae; beit: blockwise unless given)",
    "resume": "checkpoint path, or 'auto' for OUT/last.pt", "max_steps": "stop after N optimizer steps",
    "schedule_steps": SCHEDULE_STEPS_HELP,
    "batch_size": "images per device per step", "blr": "base lr: lr = blr * effective batch / 256",
    "save_every": "write a checkpoint every N epochs",
    "knn_every": "every N epochs, print and log the k-NN top-1 of the encoder on --knn-data (0 = never)",
    "knn_data": "ImageFolder root with train/ and val/ class folders, for --knn-every",
    "threads": "CPU threads per process (1 is fastest for tiny models on a busy machine); "
               "None = the cores shared among this machine's processes", "keep_last": "checkpoints to keep",
    "workers": "data-loading processes; None = min(8, cores - 1)",
    "decode": "how workers turn files into crops: full = decode the whole photo (reference); draft = JPEG "
              "decoded at 1/2-1/8 scale when the crop allows (same crops, slightly different pixels); windows = "
              "draft + only LoMaR's windows resampled; gpu = JPEGs decoded in batches on the CUDA device",
    "fsdp": "shard the model, gradients and optimizer state across the torchrun processes (FSDP2, one unit "
            "per block); sharded checkpoints checkpoint-N.dcp/, consolidated to last.pt at the end",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (``--window-size`` for ``window_size``), plus --config."""
    add_dataclass_arguments(parser, PretrainConfig, _HELP, _CHOICES, nargs_optional={"resume": "auto"})


def _parse_windows(text: str) -> int | str:
    """``--windows``: a count >= 0, 'global' (= 0, the whole image) or 'auto'."""
    from lomar.windows import parse_windows

    return "auto" if text.strip().lower() == "auto" else parse_windows(text)


def resolve_config(args: argparse.Namespace) -> PretrainConfig:
    """Recipe defaults, demo preset, YAML, flags -> a validated PretrainConfig.

    When resuming, the run's saved config replaces the defaults and preset (see _resume_values).
    """
    explicit = explicit_values(PretrainConfig, args)
    saved = _saved_config(explicit)
    if explicit.get("windows") == "auto":
        explicit["windows"] = None  # resolved below; on resume, the saved run's count
    if saved is not None:
        values = _resume_values(*saved, explicit)
    else:
        values = PretrainConfig().to_dict()
        if explicit.get("data") is None:
            preset = dict(DEMO_PRESET)
            if "model" in explicit:  # a named model brings its own widths
                for key in ("embed_dim", "depth", "num_heads"):
                    preset.pop(key)
            values.update(preset)
        values.update(explicit)
        lay_schedule_over_max_steps(values, explicit)
    config = PretrainConfig(**values)
    if config.out is None:
        config.out = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    from lomar.methods import get_method, names

    if config.method in names():  # an unknown one is reported by validate
        method = get_method(config.method)
        config.mask_ratio = method.default_mask_ratio if config.mask_ratio is None else config.mask_ratio
        config.pos = method.default_pos if config.pos is None else config.pos
    if config.workers is None:
        config.workers = default_workers()
    # --print-config only shows the settings, so an --out that holds a run is no error there
    validate(config, check_out=not getattr(args, "print_config", False))
    return config


# What may differ from the saved config on resume: where and how the run is driven, not what
# it computes. `epochs` may grow to train longer (the cosine schedule stretches from there);
# `data` may move. Everything else (model, batch, lr, masking, seed, ...) must stay.
_RUN_CONTROL = {"data", "out", "resume", "overwrite", "epochs", "max_steps", "save_every", "keep_last",
                "log_every", "workers", "threads", "device", "compile", "knn_every", "knn_data",
                "figure_images", "decode"}
_PER_INVOCATION = {"resume": None, "overwrite": False}  # never inherited from the saved run
_DERIVED = frozenset({"mask_ratio", "pos", "windows"})  # None asks for the method's default, which the saved run holds


def _saved_config(explicit: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """(settings, where from) of the run being resumed; None when there is none to resume.

    ``--resume auto`` reads OUT/last.pt (else the newest intact OUT/checkpoint-*.pt), or
    OUT/config.yaml when the run stopped before its first checkpoint (the engine then starts it
    afresh); with none of them it is a new run.
    """
    target = resume_target(explicit, sharded_ok=True)
    if target is not None:
        return _sharded_config(target) if target.is_dir() else _checkpoint_config(target)
    yaml_path = Path(explicit["out"]) / "config.yaml" if explicit.get("resume") == "auto" else None
    if yaml_path is not None and yaml_path.is_file():
        return read_yaml(PretrainConfig, yaml_path, strict=False), str(yaml_path)
    return None


def __getattr__(name: str):
    if name in ("PRETRAIN_FORMAT", "saved_settings"):  # torch: read from checkpoints only when asked
        import lomar.checkpoints.formats

        return getattr(lomar.checkpoints.formats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _checkpoint_config(path: Path) -> tuple[dict[str, Any], str]:
    from lomar.checkpoints.formats import saved_settings  # torch: not for --help
    from lomar.checkpoints.io import safe_load

    try:
        ckpt = safe_load(path, mmap=True)  # only the config is read here; the engine loads the rest
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: {exc}") from None
    if isinstance(ckpt.get("config"), dict) and ckpt["config"].get("fsdp") and "optimizer" not in ckpt:
        raise ConfigError(f"--resume {path} is the consolidated model of an --fsdp run (no optimizer state); "
                          f"pass its folder {path.parent / 'checkpoint-NNNNNN.dcp'}, or --out {path.parent} "
                          f"--resume auto")
    if not isinstance(ckpt.get("config"), dict) or "optimizer" not in ckpt:
        raise ConfigError(f"--resume {path} is not a `lomar pretrain` training checkpoint (no saved config "
                          f"and optimizer state); start a new run with another --out")
    return coerce_all(PretrainConfig, saved_settings(ckpt), str(path), strict=False), str(path)


def _sharded_config(path: Path) -> tuple[dict[str, Any], str]:
    """The saved settings of a sharded checkpoint folder (its meta.pt)."""
    from lomar.checkpoints.io import safe_load

    try:
        meta = safe_load(path / "meta.pt")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume {path}: {exc}; pass an intact checkpoint-NNNNNN.dcp folder") from None
    if not isinstance(meta.get("config"), dict):
        raise ConfigError(f"--resume {path} is not a `lomar pretrain --fsdp` checkpoint (no saved config); "
                          f"pass a checkpoint-NNNNNN.dcp folder of a run")
    return coerce_all(PretrainConfig, meta["config"], str(path), strict=False), str(path)


def _resume_values(saved: dict[str, Any], source: str, explicit: dict[str, Any]) -> dict[str, Any]:
    return resume_values(PretrainConfig, saved, source, explicit, _RUN_CONTROL, _PER_INVOCATION, _DERIVED)


def resolve_windows(config: PretrainConfig) -> int:
    """``config.windows`` as a count (0 = the whole image): a number as given; ``auto`` (or None)
    is the method's default (``Method.default_windows``; None there = the paper's rule at this image
    and patch size, :func:`lomar.windows.paper_windows`). ConfigError otherwise."""
    from lomar.windows import parse_windows

    value = config.windows
    if value is None or value == "auto":
        from lomar.methods import get_method
        from lomar.windows import paper_windows

        default = get_method(config.method).default_windows
        if default is not None:
            return default
        return paper_windows(config.img_size, vit_config(config).patch_size, config.window_size)
    try:
        return parse_windows(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def vit_config(config: PretrainConfig) -> ViTConfig:
    from lomar.models.vit import model_config  # torch: imported when a config is resolved, not for --help

    overrides = {k: getattr(config, k) for k in ("embed_dim", "depth", "num_heads", "patch_size")
                 if getattr(config, k) is not None}
    try:
        return model_config(config.model, img_size=config.img_size, pos=config.pos, **overrides)
    except ValueError as exc:
        raise ConfigError(f"--model: {exc}") from None


def validate(config: PretrainConfig, check_out: bool = True) -> None:
    """Everything that can be checked before any work; raises ConfigError naming the fix.
    Resolves ``--windows auto`` to its count (which the checks need).

    ``check_out``: refuse an --out that already holds a run (unless resuming / overwriting)."""
    from lomar.methods import get_method
    from lomar.models.masking import grid_size

    check_numbers(config)
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got {getattr(config, name)!r}")
    config.windows = resolve_windows(config)
    check_fsdp(config)
    if config.method == "mae" and config.pos != "abs":
        raise ConfigError(f"--method mae needs --pos abs (got {config.pos})")
    if config.tokenizer is not None and config.method != "beit":
        raise ConfigError(f"--tokenizer is for --method beit only (got --method {config.method}); drop it")
    vit = vit_config(config)
    if vit.embed_dim % vit.num_heads:
        raise ConfigError(f"--embed-dim {vit.embed_dim} is not divisible by --num-heads {vit.num_heads}")
    try:
        grid = grid_size(config.img_size, vit.patch_size)
        get_method(config.method).validate(config, grid)
    except ValueError as exc:
        raise ConfigError(f"at --img-size {config.img_size}: {exc}") from None
    check_decode(config)
    if config.data is not None:
        check_data(config.data)
    out = Path(config.out)
    if check_out:
        from lomar.train.run_state import check_out_folder

        try:
            check_out_folder(out)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    holds_run = (out / "last.pt").exists() or (out / "config.yaml").exists()
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 may already have started
    if check_out and holds_run and is_main and not config.resume and not config.overwrite:
        raise ConfigError(f"--out {out} already holds a run; pass --resume auto to continue it, "
                          f"--overwrite to replace it, or another --out")
    if config.knn_every and not (config.knn_data and (Path(config.knn_data) / "train").is_dir()
                                 and (Path(config.knn_data) / "val").is_dir()):
        raise ConfigError(f"--knn-every needs --knn-data ROOT holding train/ and val/ class folders, "
                          f"got {config.knn_data!r}")
    # --resume PATH was checked when its saved config was read (_saved_config)


def build_model(config: PretrainConfig, prepared: dict | None = None):
    """The model the config describes, built by its method (:mod:`lomar.methods`); ``prepared``:
    what :func:`prepare_method` returned (BEiT's freshly fitted tokenizer)."""
    from lomar.methods import get_method

    if not isinstance(config.windows, int):  # not validated (e.g. a config read from a checkpoint)
        config = dataclasses.replace(config, windows=resolve_windows(config))
    return get_method(config.method).build(config, vit_config(config), **(prepared or {}))


def prepare_method(config: PretrainConfig) -> dict:
    """The method's explicit step before building (BEiT without --tokenizer: fit one into OUT and name it
    in ``config``); -> keyword arguments for :func:`build_model`."""
    from lomar.methods import get_method
    from lomar.models.masking import grid_size

    method = get_method(config.method)
    if method.prepare is None:
        return {}
    return method.prepare(config, grid_size(config.img_size, vit_config(config).patch_size))


def dump_config(config: PretrainConfig) -> str:
    """The config as YAML, with a comment saying what ``--windows auto`` gives here."""
    from lomar.methods import get_method, names

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    if config.method not in names() or get_method(config.method).default_windows is not None:
        return text  # auto is a fixed count there, not the paper's rule
    try:
        auto = resolve_windows(dataclasses.replace(config, windows="auto"))
    except (ConfigError, ValueError):
        return text
    from lomar.windows import WINDOWS_RULE

    note = f"# --windows auto = {auto} at --img-size {config.img_size}: {WINDOWS_RULE}\n"
    return text.replace("\nwindows:", "\n" + note + "windows:", 1)
