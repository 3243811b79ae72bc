"""One declaration per setting, and the YAML reading, checks and resume rules built from it (its flags:
:mod:`lomar.train.setting_flags`).

A :class:`Setting` holds everything about one setting: default, help, choices, bounds and resume policy. A training
command's settings are a dataclass whose fields carry their declaration (``img_size: int = IMG_SIZE.field(224)``); the
other commands pass a dict of declarations. The settings shared by several commands (below) are declared once, so their
bounds, choices and help cannot drift between commands; a command may give one its own default or help
(``Setting.but``). A setting's flag is ``--window-size`` for ``window_size``, its YAML key ``window_size`` (or
``window-size``); a ``tuple[float, float]`` field takes two values on the command line and a list in YAML. Imports no
torch: every parser is built from here."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lomar.errors import UsageError
from lomar.limits import MAX_IMG_SIZE
from lomar.train.setting_names import as_given, unknown_settings
from lomar.values import brief, parse_device, parse_duration
from lomar.yaml_io import inline, read_settings

__all__ = ["ConfigError", "Setting", "setting", "declarations", "coerce_all", "read_yaml", "shown", "as_typed"]


class ConfigError(UsageError):
    """A configuration that cannot run; the CLI reports it in one line with exit code 2."""


_FIXED_RULE = ("kind", "choices", "low", "above", "high", "below", "finite", "parse", "resume", "path")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting. ``low``/``high`` are inclusive bounds, ``above``/``below`` exclusive ones; a float
    must also be finite. ``resume``: fixed (a resumed run must keep it), run-control (may change on
    resume), per-invocation (never inherited: its default unless given again), derived (None or auto asks
    for a default that the saved run already resolved)."""

    default: Any = None
    help: str = ""  # must say what a None default means ("default: ...")
    kind: type | None = None  # int | float | str | bool (of each value, with nargs); None: the default's type
    choices: tuple | None = None
    takes: tuple | None = None  # the choices one command takes (default: all): its --help and refusals list these
    low: float | None = None
    above: float | None = None
    high: float | None = None
    below: float | None = None
    finite: bool = True  # False: a float checked by the command's own code (e.g. a pair)
    resume: str = "fixed"
    parse: Callable[[str], Any] | None = None  # flag / YAML text -> value; its ValueError names the fix
    nargs: int | str | None = None
    const: Any = None  # the value of the bare flag (--resume alone = --resume auto)
    metavar: str | tuple | None = None
    flag: str | None = None  # default --name-with-dashes; "" for a positional argument
    aliases: tuple[str, ...] = ()  # deprecated flags: still accepted, with a one-line note
    old_keys: tuple[str, ...] = ()  # YAML / saved-settings keys of a renamed setting
    required: bool = False
    off: str | None = None  # the value that turns it off ('none'): a YAML null is told to write it
    path: bool = False  # a file or folder: '~' expanded; a training command records it absolute (resumable anywhere)

    def __post_init__(self) -> None:
        if self.kind is None:  # from the default (a list's: its first item's); a None default names its kind
            first = self.default[0] if isinstance(self.default, (tuple, list)) else self.default
            if first is None:
                raise TypeError(f"a setting with default {self.default!r} needs kind=int | float | str")
            object.__setattr__(self, "kind", type(first))
        object.__setattr__(self, "parse", self.parse or (os.path.expanduser if self.path else None))
        object.__setattr__(self, "takes", self.takes or self.choices)

    def but(self, **changes: Any) -> Setting:
        """This setting with another default, help, ... for one command; its rule stays."""
        if fixed := sorted(set(changes) & set(_FIXED_RULE)):
            raise TypeError(f"{', '.join(fixed)} belong to the shared declaration; declare a new setting instead")
        return dataclasses.replace(self, **changes)

    def field(self, default: Any = ..., **changes: Any) -> Any:
        """A dataclass field carrying this declaration (``default`` and ``changes`` as in :meth:`but`)."""
        declared = self.but(**changes, **({} if default is ... else {"default": default}))
        return dataclasses.field(default=declared.default, metadata={"setting": declared})

    def rule(self) -> tuple:
        return tuple(getattr(self, name) for name in _FIXED_RULE)

    def name_flag(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")

    def check(self, name: str, value: Any, choices: bool = True) -> None:
        """ConfigError naming the flag when ``value`` (each item of a tuple) breaks the declaration
        (``choices``: False where argparse checks them)."""
        for item in value if isinstance(value, (tuple, list)) else (value,):
            rule = self.broken_rule(item, choices)
            if rule:
                raise ConfigError(f"{self.name_flag(name)} must be {rule}, got {brief(item)}")

    def broken_rule(self, v: Any, choices: bool) -> str | None:
        """The rule ``v`` breaks, as an error says it ('positive', 'one of a, b'); None when it keeps them."""
        if v is None or isinstance(v, bool):
            return None
        if isinstance(v, float) and self.finite and not math.isfinite(v):
            return "a finite number"
        if choices and self.takes is not None and v not in self.takes:
            return "one of " + ", ".join(map(str, self.takes))
        if not isinstance(v, (int, float)):  # an empty path would be the working folder
            return "non-empty" if isinstance(v, str) and not v.strip() else None
        lo, hi = (self.low, "[") if self.low is not None else (self.above, "("), \
            (self.high, "]") if self.high is not None else (self.below, ")")
        if isinstance(v, float) and lo[0] is not None and hi[0] is not None:  # a fraction reads best as an interval
            if (v >= lo[0] if lo[1] == "[" else v > lo[0]) and (v <= hi[0] if hi[1] == "]" else v < hi[0]):
                return None
            interval = f"in {lo[1]}{lo[0]:g}, {hi[0]:g}{hi[1]}"
            return "a probability in [0, 1]" if interval == "in [0, 1]" else interval
        for broken, rule in ((self.low is not None and v < self.low, f">= {self.low}"),
                             (self.above is not None and v <= self.above,
                              "positive" if self.above == 0 else f"> {self.above}"),
                             (self.high is not None and v > self.high, f"at most {self.high}"),
                             (self.below is not None and v >= self.below, f"below {self.below}")):
            if broken:
                return rule
        return None


def setting(default: Any, help: str, **rule: Any) -> Any:
    """A dataclass field declaring a setting of one command only (see :class:`Setting`)."""
    return Setting(default, help, **rule).field()


# ---- the settings several commands share ---------------------------------------------------
_RUN = "run-control"
DEVICE = Setting("auto", "auto (CUDA if available), cpu, cuda or cuda:N", parse=parse_device, resume=_RUN)
SEED = Setting(0, "random seed", low=0, high=2**31 - 1)  # numpy seeds (seed + rank) must stay below 2**32
THREADS = Setting(None, "CPU threads per process (default: the cores shared among this machine's processes)",
                  kind=int, above=0, high=4096, resume=_RUN)
WORKERS = Setting(None, "data-loading processes (default: min(8, cores - 1))", kind=int, low=0, resume=_RUN)
IMG_SIZE = Setting(224, "image size in pixels", above=0, high=MAX_IMG_SIZE)
BATCH_SIZE = Setting(64, "images per device per step", above=0)
ACCUM_STEPS = Setting(1, "batches per optimizer step: the effective batch is --batch-size x this x processes",
                      above=0, aliases=("--accum-iter",), old_keys=("accum_iter",))
EPOCHS = Setting(400, "passes over the training data", above=0, resume=_RUN)
MAX_STEPS = Setting(None, "stop after N optimizer steps (default: at the end of --epochs)", kind=int, above=0,
                    resume=_RUN)
SCHEDULE_STEPS = Setting(
    None, "length of the lr schedule (warm-up + cosine) in optimizer steps; default --epochs x the steps per epoch, "
    "except a new run given --max-steps and no --epochs: its schedule spans --max-steps, the warm-up keeping the "
    "recipe's share (--warmup-epochs / --epochs)", kind=int, above=0)
BLR = Setting(1.5e-4, "base lr: lr = blr x effective batch / 256", low=0, above=0)
LR = Setting(None, "absolute peak lr (default: from --blr)", kind=float, low=0, above=0)
MIN_LR = Setting(0.0, "lr at the end of the cosine schedule", low=0)
WARMUP_EPOCHS = Setting(40, "epochs of linear lr warm-up, in [0, --epochs]", kind=float)
WEIGHT_DECAY = Setting(0.05, "AdamW weight decay", low=0)
CLIP_GRAD = Setting(None, "clip the gradient norm to this (default: no clipping)", kind=float, above=0)
PRECISION = Setting("auto", "auto = bf16 autocast where the hardware multiplies bf16 natively (a CUDA GPU of "
                    "compute capability 8+, a CPU with AVX-512 BF16 or AMX), else fp32; a resume's auto keeps the "
                    "precision the run trained in", choices=("auto", "fp32", "bf16", "fp16"), resume=_RUN)
# what 'auto' resolves to, and a checkpoint records having trained in: --precision's other choices
PRECISIONS = tuple(choice for choice in PRECISION.choices if choice != "auto")
LOG_EVERY = Setting(20, "print the training loss every N optimizer steps (metrics.jsonl and TensorBoard get every "
                    "step)", above=0, resume=_RUN)
EVAL_EVERY = Setting(None, "evaluate (and checkpoint) every N optimizer steps and at the end, instead of at each "
                     "epoch's end (default: each epoch's end and the end)", kind=int, above=0, resume=_RUN)
TIME_LIMIT = Setting(None, "wall-clock limit from lomar's start, the final save in it: the run stops as SIGTERM "
                    "does (exit 75; 0 under torchrun) at the last step after which one more (the slowest recent) and "
                    "the save (last timed) fit; seconds (5400), 90m, 1h30m, 2d, HH:MM:SS, D-HH:MM:SS (default: none)",
                    kind=int, above=0, parse=parse_duration, metavar="DURATION", resume=_RUN)
OUT = Setting(None, "output folder (default: runs/<timestamp>)", kind=str, resume=_RUN)
RESUME = Setting(None, "checkpoint path, or 'auto' for the newest state in --out (default: a new run)", kind=str,
                 const="auto", nargs="?", metavar="PATH|auto", resume="per-invocation")
OVERWRITE = Setting(False, "replace a run already in --out (or rewind it to an older --resume checkpoint)",
                    resume="per-invocation")
COMPILE = Setting(False, "torch.compile the model", resume=_RUN)
COMPILE_MODE = Setting("default", "torch.compile mode with --compile: reduce-overhead adds CUDA graphs (the step's "
                       "launches replayed as one), max-autotune also tunes the kernels (minutes of compiling); "
                       "the two differ from default on CUDA only", resume=_RUN,
                       choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
DATA = Setting(None, "ImageFolder root of train/ and val/ (default: --train, --val)", kind=str, path=True, resume=_RUN)
TRAIN = Setting(None, "ImageFolder root of the training split, instead of --data (default: ROOT/train)", kind=str,
                path=True, resume=_RUN)
VAL = Setting(None, "ImageFolder root of the validation split, instead of --data (default: ROOT/val)", kind=str,
              path=True, resume=_RUN)
PRETRAINED = Setting(None, "our pretrain/finetune checkpoint, a run folder (its export, else its best.pt, else "
                     "last.pt), an exported folder, or an original LoMaR / MAE checkpoint", kind=str, path=True,
                     resume=_RUN)
# lomar.models.vit.list_models()'s names, written out so that --help needs no torch (a test keeps the two equal)
MODEL_NAMES = tuple(f"vit_{s}_patch{p}" for s in "mini tiny small base large huge".split() for p in (8, 14, 16))
MODEL = Setting("vit_base_patch16", f"encoder: {', '.join(MODEL_NAMES)}", choices=MODEL_NAMES, metavar="NAME")
# detect, segment: --model builds a random encoder alone (encoder_settings.model_only_without_pretrained)
RANDOM_MODEL = MODEL.but(default=None, help=MODEL.help + "; the random encoder's architecture (default: "
                         "vit_base_patch16 without --pretrained, whose encoder brings its own)")
DEPTH = Setting(None, "transformer blocks (default: the --model's)", kind=int, above=0)
NUM_HEADS = Setting(None, "attention heads (default: the --model's)", kind=int, above=0)
WINDOW_SIZE = Setting(7, "window size K in patches, every method's (BEiT's blockwise masks: K >= 3)", above=0)
# finetune, detect, segment: the encoder under a task head
LAYER_DECAY = Setting(0.65, "lr scale per layer below the top", above=0, high=1)
DROP_PATH = Setting(0.1, "stochastic depth rate", low=0, below=1)
TRAIN_POS_EMBED = Setting(True, "train an absolute position table (MAE encoders) as MAE's finetuning does; "
                          "--no-train-pos-embed keeps it fixed, as runs of lomar before 2026-12-05 did")
REL_POS = Setting("auto", "relative position term added to an encoder without iRPE (MAE's), zero-initialised: auto = "
                  "the recipe's (detect: ViTDet's decomposed, segment: mmsegmentation's bias table; none for a "
                  "LoMaR encoder), none, decomposed or bias", choices=("auto", "none", "decomposed", "bias"),
                  resume="derived", off="none")
GRAD_CHECKPOINTING = Setting(False, "recompute each block in the backward pass: less memory at high resolution")
GLOBAL_BLOCKS = Setting(None, "with --window-size N > 0: the blocks (0-based) that keep global attention (default: "
                        "ViTDet's, the last block of each quarter of the depth: 2 5 8 11 for ViT-B)", low=0,
                        nargs="*", metavar="I", kind=int)
ATTENTION = Setting("auto", "how the iRPE bias is computed, same result: auto = dense for short sequences, above that "
                    "flex on CUDA and query chunks elsewhere (see lomar bench --task backbone)",
                    choices=("auto", "dense", "chunked", "flex"), resume=_RUN)
DECODER_NUM_HEADS = Setting(16, "MAE decoder attention heads", above=0)
DECODE = Setting("full", "how workers turn files into crops: full = decode the whole photo (reference); draft = JPEG "
                 "decoded at 1/2-1/8 scale when the crop allows (same crops, slightly different pixels); windows = "
                 "draft + only the windows resampled (LoMaR; MAE, BEiT with --windows N: see README); gpu = JPEGs "
                 "decoded in batches on the CUDA device", choices=("full", "draft", "windows", "gpu"), resume=_RUN)
JSON = Setting(None, "also write the result to this JSON file (default: none)", kind=str, metavar="FILE", path=True)
TO = Setting(None, "output path", kind=str, required=True, path=True)


def declarations(cls: type) -> dict[str, Setting]:
    """{field name: its Setting} of a settings dataclass, a base class's (the shared run control) last."""
    inherited = {name for base in cls.__mro__[1:] for name in getattr(base, "__dataclass_fields__", ())}
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.name in inherited)
    return {f.name: f.metadata["setting"] for f in fields}


def check_compile_mode(config: Any) -> None:
    """``--compile-mode`` only with ``--compile`` (``config``: any settings holding both)."""
    if config.compile_mode != "default" and not config.compile:
        raise ConfigError(f"--compile-mode {config.compile_mode} applies to a compiled model only; add --compile")


def shown(value: Any) -> str:
    """A setting as it is typed on the command line: (0.5, 1.0) -> '0.5 1.0'."""
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def as_typed(flag: str, value: Any) -> str:
    """A setting's ``flag`` and ``value`` as typed on the command line: ``--no-FLAG`` for False, the flag alone for
    True, else the flag and the value (:func:`shown`)."""
    return f"--no-{flag[2:]}" if value is False else flag if value is True else f"{flag} {shown(value)}"


# ---- YAML and saved settings ----------------------------------------------------------------
def _coerce(s: Setting, name: str, value: Any, source: str) -> Any:
    """A YAML or saved value as its setting's kind; YAML 1.1 reads ``1e-3`` as a string."""
    where = as_given(name, "null" if value is None else brief(value), source)
    if value is None and s.default is None:
        return None
    if value is None:  # the default as an example: what windows (auto or N) or betas (a pair) take
        off = f", or {name}: {s.off} for off" if s.off else ""  # null reads as 'unset' to some, 'off' to others
        raise ConfigError(f"{where} is not allowed: {name} takes a value, e.g. {name}: {inline(s.default)}{off}; "
                          f"write one or remove the line")
    if s.nargs in (None, "?"):
        return _coerce_scalar(s, name, value, where)
    count = s.nargs if isinstance(s.nargs, int) else None
    wrong = ConfigError(f"{where} must be a list of {f'{count} ' if count else ''}"
                        f"{'strings' if s.kind is str else 'numbers'}, e.g. {name}: {list(s.default or (2, 5))}")
    if not isinstance(value, (list, tuple)) or len(value) != (count or len(value)):
        raise wrong
    try:
        return tuple(_coerce_scalar(s, name, item, where) for item in value)
    except ConfigError:
        raise wrong from None


def _coerce_scalar(s: Setting, name: str, value: Any, where: str) -> Any:
    if s.kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where} must be a {'string' if s.kind is str else 'number'}")
    if s.parse is not None:  # a YAML number as its flag's text: time_limit: 1.5 is --time-limit 1.5's 2 s
        try:
            return s.parse(str(value))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if s.kind is str:
        return str(value)  # e.g. `out: 2024`
    if isinstance(value, str):
        try:
            return s.kind(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                example = "1e-3" if s.kind is float else s.default if isinstance(s.default, int) else 1
                raise ConfigError(f"{where} is not a number; write e.g. {name}: {example}") from None
    if s.kind is float:
        return float(value)
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{where} must be a whole number")
    return int(value)


def coerce_all(cls: type, raw: dict, source: str, strict: bool = True) -> dict[str, Any]:
    """Setting names normalised (``window-size`` and renamed keys -> ``window_size``) and values typed. ``strict``:
    unknown names are an error (a user's file); else skipped (a run saved by another version)."""
    renamed = {old: name for name, s in declarations(cls).items() for old in s.old_keys}
    if bad_keys := [repr(k) for k in raw if not isinstance(k, str)]:
        raise ConfigError(f"setting names in {source} must be strings, got {', '.join(bad_keys)}")
    names = {k: renamed.get(k.replace("-", "_"), k.replace("-", "_")) for k in raw}
    if strict and (twice := [k for k in raw if list(names.values()).count(names[k]) > 1]):  # else the last won
        raise ConfigError(f"{' and '.join(twice)} in {source} are one setting, {names[twice[0]]}; keep one")
    raw = {names[k]: v for k, v in raw.items()}
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
    if unknown and strict:
        raise ConfigError(unknown_settings(unknown, [f.name for f in dataclasses.fields(cls)], source, cls))
    declared = declarations(cls)
    return {k: _coerce(declared[k], k, v, source) for k, v in raw.items() if k not in unknown}


def read_yaml(cls: type, path: Path, strict: bool = True) -> dict[str, Any]:
    """The settings of a YAML file, typed."""
    raw = read_settings(path, "config file", error=ConfigError) or {}  # in YAML's encodings, not the locale's
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return coerce_all(cls, raw, str(path), strict)
