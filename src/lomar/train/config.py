"""The pretraining configuration: recipe defaults, demo preset, YAML + flags, validation.

Resolution order, later wins: the generic defaults (LoMaR's recipe, SPEC §4) → the ``--method``'s
own pretraining recipe (``Method.recipe``: betas, lr, warm-up, min lr, clipping, crops, jitter,
layer scale) → the demo preset (``--preset demo``, the default when no ``--data`` is given; it sizes
a two-minute run, its lr and warm-up included) → the YAML file (``--config``) → command-line flags.
A resumed run (``--resume``) starts from its saved config instead, and only run-control settings may change.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lomar.checkpoints.file_names import RUN_CONFIG
from lomar.errors import first_on_machine, in_flags
from lomar.methods import get_method, names
from lomar.train import settings as S
from lomar.train.config_checks import (
    check_data,
    check_decode,
    check_fsdp,
    check_method_settings,
    check_min_lr,
    check_warmup,
    parse_share,
)
from lomar.train.setting_names import setting_named, setting_of, source_of
from lomar.train.settings import ConfigError
from lomar.train.task_config import SavedRun, TaskConfig
from lomar.values import command_line
from lomar.window_counts import WINDOWS_RULE, paper_windows, parse_windows, windows_source

if TYPE_CHECKING:
    from lomar.models.vit import ViTConfig

__all__ = ["PretrainConfig", "DEMO_PRESET", "add_config_arguments", "resolve_config", "build_model",
           "vit_config", "method_recipe"]

_R = "lomar, mae"  # the methods whose recipe the generic defaults are
# lomar.models.masking's and .windows' parameters -> the settings that give them
_MASKING_SETTINGS = {"window_size": "window_size", "num_windows": "windows", "windows": "windows",
                     "mask_ratio": "mask_ratio", "placement": "window_placement"}


@dataclass
class PretrainConfig(TaskConfig):
    COMMAND = "pretrain"
    # data and output
    preset: str | None = S.setting(None, "demo = a 128-wide, 4-block ViT on 96 px crops for a few CPU minutes; paper = "
                                   "the --method's recipe (ViT-B/16, 224 px; lomar, mae 400 epochs, beit 800) "
                                   "(default: demo without --data, paper with it)", choices=("demo", "paper"),
                                   resume="derived", kind=str)
    data: str | None = S.DATA.field(help="image folder (recursive), .txt list of paths, or tar shards, gzipped or not "
                                       "('shards/*.tar', 'shard-{000..009}.tar.gz') (default: the built-in demo "
                                       "photographs)")
    out: str | None = S.OUT.field()
    # method and model
    method: str = S.setting("lomar", "pretraining method: lomar (local windows), mae (encoder-decoder), beit (token "
                          "prediction)", choices=names())
    model: str = S.MODEL.field()
    embed_dim: int | None = S.setting(None, "token width (default: the --model's)", above=0, kind=int)
    depth: int | None = S.DEPTH.field()
    num_heads: int | None = S.NUM_HEADS.field()
    patch_size: int | None = S.setting(None, "patch size in pixels (default: the --model's)", above=0, kind=int)
    img_size: int = S.IMG_SIZE.field()
    pos: str | None = S.setting(None, "position encoding (default: rpe for lomar, abs for mae, none for beit: "
                                      "its relative bias)",
                              choices=("rpe", "abs", "none"), resume="derived", kind=str)
    window_size: int = S.WINDOW_SIZE.field()
    windows: str = S.setting(  # an int once resolved
        "auto", "K x K windows per image for any method; 0 or 'global' = the whole image; auto = lomar: the paper's "
        "counts (7x7 windows, B/16: 4 at 224 px, 6 at 384, 9 at 448; B/8: 4 at 224; KxK windows at 224 px: 5: 8, "
        "9: 3, 11: 2, 14: 1), elsewhere scaled with the patch-grid area and by 49/K^2 (--print-config shows the "
        "count); mae, beit: global", resume="derived",
        parse=lambda text: "auto" if text.strip().lower() == "auto" else parse_windows(text))
    window_placement: str = S.setting(
        "permutation", "how windows are placed: permutation = the original's (tops and lefts from two random "
        "permutations: no two windows of an image share a top row or a left column, so at most min(H-K+1, W-K+1) "
        "windows); distinct = any distinct positions of the (H-K+1)x(W-K+1) grid (more windows on small grids)",
        choices=("permutation", "distinct"))
    mask_ratio: float | None = S.setting(None, "masked share per window (default: 0.8 lomar, 0.75 mae; beit: "
                                         "blockwise)", resume="derived", kind=float)
    norm_pix_loss: bool = S.setting(True, "reconstruct per-patch normalised pixels")
    decoder_embed_dim: int = S.setting(512, "MAE decoder width", above=0)
    decoder_depth: int = S.setting(8, "MAE decoder blocks", above=0)
    decoder_num_heads: int = S.DECODER_NUM_HEADS.field()
    tokenizer: str | None = S.setting(None, "--method beit: dVAE (encoder.pkl, state dict, safetensors) or k-means "
                                    "tokenizer file (default: fit the built-in k-means tokenizer on the data into "
                                    "OUT/tokenizer.safetensors)", kind=str, path=True)
    # optimisation (original recipe)
    batch_size: int = S.BATCH_SIZE.field()
    accum_steps: int = S.ACCUM_STEPS.field()
    epochs: int = S.EPOCHS.field(help=S.EPOCHS.help + f" (default: the --method's recipe; {_R}: 400; beit: 800)")
    max_steps: int | None = S.MAX_STEPS.field()
    schedule_steps: int | None = S.SCHEDULE_STEPS.field()
    # optimisation: the generic defaults are LoMaR's (= MAE's) recipe; each --method's recipe replaces them
    blr: float = S.BLR.field(help=S.BLR.help + f" (default: the --method's recipe, {_R}: 1.5e-4)")
    lr: float | None = S.LR.field(help=f"absolute peak lr (default: the --method's recipe; {_R}: from --blr; beit: "
                                       f"1.5e-3, not scaled by the batch)")
    min_lr: float = S.MIN_LR.field(help=S.MIN_LR.help + f" (default: the --method's recipe; {_R}: 0; beit: 1e-5)")
    warmup_epochs: float = S.WARMUP_EPOCHS.field(help=S.WARMUP_EPOCHS.help + f" (default: the --method's recipe; "
                                                                             f"{_R}: 40; beit: 10)")
    weight_decay: float = S.WEIGHT_DECAY.field(help=S.WEIGHT_DECAY.help + " (default: the --method's recipe: 0.05)")
    clip_grad: float | None = S.CLIP_GRAD.field(help=f"clip the gradient norm to this (default: the --method's "
                                                     f"recipe; {_R}: no clipping; beit: 3.0)")
    betas: tuple[float, float] = S.setting(
        (0.9, 0.95), f"AdamW betas (default: the --method's recipe; {_R}: 0.9 0.95; beit: 0.9 0.999)", low=0,
        below=1, nargs=2, metavar=("B1", "B2"))
    crop_scale: tuple[float, float] = S.setting(  # checked as a pair in validate
        (0.2, 1.0), f"area range of the random resized crop, fractions of the image, 0 < LOW <= HIGH <= 1 (default: "
        f"the --method's recipe; {_R}: 0.2 1.0; beit: 0.08 1.0)", finite=False, nargs=2, metavar=("LOW", "HIGH"))
    color_jitter: float = S.setting(0.0, f"ColorJitter strength for brightness, contrast and saturation, 0 = off; "
                                         f"--decode full only (default: the --method's recipe; {_R}: 0; beit: 0.4)",
                                    low=0)
    layer_scale_init: float | None = S.setting(
        None, "--method beit: layer-scale start (default: BEiT's by model size: 0.1 up to ViT-B, 1e-5 from ViT-L's "
        "width 1024; at most 1, where the branch passes unscaled)", kind=float, above=0, high=1.0,
        resume="derived")
    compile: bool = S.COMPILE.field()
    compile_mode: str = S.COMPILE_MODE.field()
    fsdp: bool = S.setting(False, "shard the model, gradients and optimizer state across the torchrun processes "
                         "(FSDP2, one unit per block); sharded checkpoints checkpoint-N.dcp/, consolidated to last.pt "
                         "at the end")
    decode: str = S.DECODE.field()
    decode_ahead: int = S.setting(1, "--decode gpu: batches decoded ahead of the training step, by a background "
                                  "thread on a CUDA stream of its own, so that decoding overlaps training (0: "
                                  "each batch decoded just before its step)", low=0, resume="run-control")
    cpu_decode_share: float | str = S.setting(
        "auto", "--decode gpu: share of the photos the loader workers decode themselves (at reduced size, as "
        "--decode draft) beside the device's decoder, 0-1; auto = balanced after every batch from the measured "
        "cost of both (0 without --workers)", kind=float, low=0, high=1,
        parse=parse_share, resume="run-control")
    gpu_decoder: str = S.setting(
        "torchvision", "--decode gpu: the device's JPEG decoder: torchvision (batched nvjpeg) or nvimgcodec (the "
        "GPU's hardware JPEG engines, not its streaming multiprocessors; pip install nvidia-nvimgcodec-cu13 "
        "nvidia-nvjpeg)",
        choices=("torchvision", "nvimgcodec"), resume="run-control")
    # running
    threads: int | None = S.THREADS.field(help="CPU threads per process; 1 is fastest for tiny models on a busy "
                                               "machine (default: the cores shared among this machine's processes)")
    save_every: int = S.setting(20, "write a checkpoint every N epochs", above=0, resume="run-control")
    keep_last: int = S.setting(2, "checkpoints to keep", above=0, resume="run-control")
    figure_images: int = S.setting(4, "images in the reconstruction figures", above=0, high=64, resume="run-control")
    knn_every: int = S.setting(0, "every N epochs, print and log the k-NN top-1 of the encoder on --knn-data "
                             "(0 = never)", low=0, resume="run-control")
    knn_data: str | None = S.setting(None, "ImageFolder root with train/ and val/ class folders, for --knn-every "
                                   "(default: none)", resume="run-control", kind=str, path=True)
    # fixed for the run, unlike --decode: a k-NN curve whose pixels changed mid-run would not compare with itself
    knn_decode: str = S.setting(
        "auto", "how --knn-every decodes --knn-data's JPEGs, as lomar knn --decode: full or draft (at the 1/2-1/8 "
        "DCT scale the resize allows; pixels within about a level); auto = full with --decode full, draft with the "
        "others. A run keeps what it started with (one saved before this setting: full)",
        choices=("auto", "full", "draft"), resume="derived")

    @classmethod
    def saved_run(cls, explicit: dict[str, Any]) -> SavedRun | None:
        """The checkpoint's settings (:meth:`TaskConfig.saved_run`), or with ``--resume auto`` and none in OUT
        its config.yaml (a run stopped before its first checkpoint: the engine then starts it afresh)."""
        saved = super().saved_run(explicit)
        yaml_path = Path(explicit["out"]) / RUN_CONFIG if explicit.get("resume") == "auto" else None
        if saved is None and yaml_path is not None and yaml_path.is_file():
            saved = SavedRun(S.read_yaml(PretrainConfig, yaml_path, strict=False), str(yaml_path))
        if saved is None:
            return None
        settings = saved.settings
        if "window_placement" not in settings:
            settings["window_placement"] = "distinct"  # a run saved before placements existed drew distinct cells
        if "knn_decode" not in settings:
            settings["knn_decode"] = "full"  # a run saved before the setting scored its k-NN on full decodes
        if settings.get("method") in names():  # an unknown one is reported by validate
            checkpoint = saved.point.meta if saved.point is not None else None  # None: read from a config.yaml
            try:
                note = get_method(settings["method"]).resume_settings(settings, saved.source, checkpoint, explicit)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if note and first_on_machine():
                print(f"lomar pretrain: note: {note}", file=sys.stderr)
        return saved

    @staticmethod
    def saved_settings(checkpoint: dict, path: Path) -> dict:
        """The settings of a pretraining checkpoint (or of a sharded one's meta.pt), read as today's."""
        from lomar.checkpoints.reader import saved_settings  # torch: not for --help

        config, sharded = checkpoint.get("config"), path.is_dir()
        if sharded and not isinstance(config, dict):
            raise ConfigError(f"--resume {path} is not a `lomar pretrain --fsdp` checkpoint (no saved config); "
                              f"pass a checkpoint-NNNNNN.dcp folder of a run")
        if not sharded and isinstance(config, dict) and config.get("fsdp") and "optimizer" not in checkpoint:
            raise ConfigError(f"--resume {path} is the consolidated model of an --fsdp run (no optimizer state); "
                              f"pass its folder {command_line(path.parent / 'checkpoint-NNNNNN.dcp')}, or "
                              f"{command_line('--out', path.parent, '--resume', 'auto')}")
        if not sharded and (not isinstance(config, dict) or "optimizer" not in checkpoint):
            raise ConfigError(f"--resume {path} is not a `lomar pretrain` training checkpoint (no saved config "
                              f"and optimizer state); start a new run with another --out")
        return saved_settings(checkpoint)

    @classmethod
    def fresh_values(cls, explicit: dict[str, Any]) -> dict[str, Any]:
        """Recipe defaults, demo preset, YAML, flags."""
        values = PretrainConfig().to_dict()
        values.update(method_recipe(explicit.get("method", values["method"])))
        values["preset"] = explicit.get("preset") or ("demo" if explicit.get("data") is None else "paper")
        if values["preset"] == "demo":  # a named model brings its own widths
            values.update({k: v for k, v in DEMO_PRESET.items()
                           if "model" not in explicit or k not in ("embed_dim", "depth", "num_heads")})
        if "blr" in explicit and "lr" not in explicit:  # after the demo's lr 1e-3, which would hide a given --blr
            values["lr"] = None  # a given base lr scales with the batch, over a recipe's absolute lr (BEiT's)
        values.update(explicit)
        check_method_settings(values, S.declarations(cls))
        return values

    def complete(self, explicit: dict[str, Any]) -> None:
        if explicit.get("knn_data") is not None and not self.knn_every:  # else read by nothing (null: a saved yaml)
            given = setting_of(self, "knn_data") if source_of(self, "knn_data") else "--knn-data"
            raise ConfigError(f"{given} is used only with --knn-every N (a k-NN evaluation every N epochs); add "
                              f"--knn-every 1, or drop {setting_named(self, 'knn_data', 'from')}")
        # a flag only: a run's config.yaml records the knn_decode its auto resolved to, k-NN or not
        if explicit.get("knn_decode", "auto") != "auto" and not (source_of(self, "knn_decode") or self.knn_every):
            raise ConfigError(f"--knn-decode {explicit['knn_decode']} decodes --knn-every's k-NN images, but this run "
                              f"has no k-NN evaluation; add --knn-every 1 --knn-data ROOT, or drop --knn-decode")
        if self.method in names():  # an unknown one is reported by validate
            method = get_method(self.method)
            self.mask_ratio = method.default_mask_ratio if self.mask_ratio is None else self.mask_ratio
            self.pos = method.default_pos if self.pos is None else self.pos
        if self.knn_decode == "auto":  # a new run's; a resumed one's was resolved when it started
            self.knn_decode = "full" if self.decode == "full" else "draft"

    def notes(self) -> list[str]:
        notes = []
        unused = [f"--{flag} {value}" for flag, value, default in (  # a sweep over --windows keeps them
            ("window-size", self.window_size, S.WINDOW_SIZE.default),
            ("window-placement", self.window_placement, "permutation")) if value != default and not self.windows]
        if unused:
            notes.append(f"{' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} unused: this --method "
                         f"{self.method} run has no windows (--windows 0: the whole image)")
        if self.decode != "gpu" and self.decode_ahead != 1:  # a note: a sweep over --decode keeps one
            notes.append(f"--decode-ahead {self.decode_ahead} is unused: it decodes --decode gpu's batches ahead, and "
                         f"this run is --decode {self.decode}")
        return notes

    def check_settings(self) -> None:
        """The checks that need no output folder; resolves ``--windows auto`` to its count (which they need)."""
        from lomar.models.masking import grid_size  # torch: not for --help

        check_warmup(self)
        S.check_compile_mode(self)
        check_min_lr(self)
        self.windows = resolve_windows(self)
        check_fsdp(self)
        method = get_method(self.method)
        if method.only_pos is not None and self.pos != method.only_pos:
            raise ConfigError(f"--method {self.method} needs --pos {method.only_pos} (got {self.pos})")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:  # also false for nan
            raise ConfigError(f"--crop-scale must be LOW HIGH with 0 < LOW <= HIGH <= 1 (fractions of the image area), "
                              f"got {low:g} {high:g}; e.g. --crop-scale 0.2 1.0 (LoMaR's recipe) or 0.08 1.0 (BEiT's)")
        if self.color_jitter and self.decode != "full":
            recipe = (f" (--method {self.method}'s recipe)" if method_recipe(self.method).get("color_jitter")
                      == self.color_jitter else "")
            raise ConfigError(f"--color-jitter {self.color_jitter:g}{recipe} is applied by --decode full only (got "
                              f"--decode {self.decode}); pass --decode full, or --color-jitter 0")
        vit = vit_config(self)
        if self.layer_scale_init is None and method.layer_scale_by_width is not None:
            self.layer_scale_init = method.layer_scale_by_width(vit.embed_dim)
        try:
            grid = grid_size(self.img_size, vit.patch_size)
            method.validate(self, grid)
        except ValueError as exc:
            declared = S.declarations(type(self))  # the masking's parameters, named as this command's flags
            flags = {param: declared[name].name_flag(name) for param, name in _MASKING_SETTINGS.items()}
            raise ConfigError(f"at --img-size {self.img_size}: {in_flags(str(exc), flags)}") from None
        check_decode(self, vit.patch_size)
        if self.data is not None:
            check_data(self.data)
        if self.knn_every and not (self.knn_data and (Path(self.knn_data) / "train").is_dir()
                                     and (Path(self.knn_data) / "val").is_dir()):
            lacks = f"; {self.knn_data} does not" if self.knn_data else "; pass it, or --knn-every 0"
            raise ConfigError(f"--knn-every {self.knn_every} needs --knn-data ROOT holding train/ and val/ class "
                              f"folders{lacks}")
        # --resume PATH was checked when its saved config was read (saved_run)

    def dump(self, invocation: bool = False) -> str:
        """:meth:`TaskConfig.dump`, with a comment saying what ``--windows auto`` gives here."""
        text = yaml.safe_dump(self.to_dict(record=not invocation), sort_keys=False)
        if self.method in names():
            text = f"# recipe defaults: {get_method(self.method).recipe_source}\n" + text
        if self.method not in names() or get_method(self.method).default_windows is not None:
            return text  # auto is a fixed count there, not the paper's rule
        try:
            auto = resolve_windows(dataclasses.replace(self, windows="auto"))
        except (ConfigError, ValueError):
            return text

        patch = vit_config(self).patch_size
        why = ("the paper's count for this patch, image and window size"
               if windows_source(self.img_size, patch, self.window_size) == "paper" else WINDOWS_RULE)
        # a count given otherwise is not auto's: the line says both, not auto's above another value
        given = f"--windows auto = {auto}" if self.windows == auto else \
            f"--windows {self.windows} as set (auto: {auto})"
        note = f"# {given} at --img-size {self.img_size}, patch {patch}, window {self.window_size}: {why}\n"
        return text.replace("\nwindows:", "\n" + note + "windows:", 1)


# A tiny model on 96 px crops of the 15 bundled photographs (120 crops an epoch, 7 steps of 16,
# 3 windows per image by --windows auto): 0.1-0.3 s a step, so 672 steps train for 1 to 3.5 minutes
# by CPU model on an idle 2-core machine, long enough for the reconstructions to turn from coloured
# noise into the images' shapes. Figures at steps 0, 224, 448 and 672. One torch thread although the
# data worker needs only ~5 % of the other core (3.5 of 56 CPU-seconds in 120 steps): on a busy
# 2-core machine a second thread made a step 2.5-8x slower (lomar bench, 2026-12-05; not timed on an
# idle one), and another count also changes the run's float sums.
DEMO_PRESET: dict[str, Any] = dict(
    model="vit_mini_patch8", embed_dim=128, depth=4, num_heads=4, img_size=96,
    batch_size=16, epochs=96, lr=1e-3, warmup_epochs=5, save_every=32, workers=1, threads=1, log_every=50,
    device="cpu",
)

add_config_arguments = PretrainConfig.add_arguments
resolve_config = PretrainConfig.resolve


def method_recipe(method: str) -> dict[str, Any]:
    """The pretraining recipe of ``method`` (``Method.recipe``); {} for an unknown name (validate reports it)."""
    return dict(get_method(method).recipe) if method in names() else {}


def resolve_windows(config: PretrainConfig) -> int:
    """``config.windows`` as a count (0 = the whole image): a number as given; ``auto`` (or None)
    is the method's default (``Method.default_windows``; None there = the paper's rule at this image
    and patch size, :func:`lomar.window_counts.paper_windows`). ConfigError otherwise."""
    value = config.windows
    if value is None or value == "auto":
        default = get_method(config.method).default_windows
        if default is not None:
            return default
        return paper_windows(config.img_size, vit_config(config).patch_size, config.window_size,
                             config.window_placement)
    try:
        return parse_windows(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def vit_config(config: PretrainConfig) -> ViTConfig:
    from lomar.models.vit import model_config  # torch: imported when a config is resolved, not for --help

    overrides = {k: getattr(config, k) for k in ("embed_dim", "depth", "num_heads", "patch_size")
                 if getattr(config, k) is not None}
    try:
        base = model_config(config.model)
        dim, heads = overrides.get("embed_dim", base.embed_dim), overrides.get("num_heads", base.num_heads)
        if dim % heads == 0:
            return dataclasses.replace(base, img_size=config.img_size, pos=config.pos, **overrides)
    except ValueError as exc:
        raise ConfigError(f"--model: {exc}") from None
    raise ConfigError(f"--embed-dim {dim} is not divisible by --num-heads {heads}; pick a divisor of {dim}")


def build_model(config: PretrainConfig, prepared: dict | None = None):
    """The model the config describes, built by its method (:mod:`lomar.methods`); ``prepared``:
    what :func:`prepare_method` returned (BEiT's freshly fitted tokenizer)."""
    if not isinstance(config.windows, int):  # not validated (e.g. a config read from a checkpoint)
        config = dataclasses.replace(config, windows=resolve_windows(config))
    return get_method(config.method).build(config, vit_config(config), **(prepared or {}))


def prepare_method(config: PretrainConfig) -> dict:
    """The method's explicit step before building (BEiT without --tokenizer: fit one into OUT and name it
    in ``config``); -> keyword arguments for :func:`build_model`."""
    from lomar.models.masking import grid_size  # torch: not for --help

    method = get_method(config.method)
    if method.prepare is None:
        return {}
    return method.prepare(config, grid_size(config.img_size, vit_config(config).patch_size))
