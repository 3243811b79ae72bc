"""The configs' checks across settings: ``lomar pretrain``'s ``--fsdp``, ``--data``, ``--decode`` and the settings
that only some methods read; finetune's, detect's and segment's ``--eval-only`` (its model, the settings it keeps,
the training settings it leaves unread); the warm-up and ``--min-lr`` checks of the commands with a cosine schedule.
Each raises :class:`ConfigError` naming the fix. Imports no torch."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from lomar.checkpoints.kinds import is_probe_file
from lomar.lr_schedule import peak_lr
from lomar.methods import get_method, names
from lomar.train import settings as S
from lomar.train.encoder_settings import check_pretrained
from lomar.train.setting_names import source_of
from lomar.train.settings import ConfigError
from lomar.values import command_line

__all__ = ["check_fsdp", "check_data", "check_decode", "check_method_settings", "parse_share", "EVAL_DECODES",
           "refuse_training_settings", "check_warmup", "check_min_lr"]


def check_method_settings(values: dict[str, Any], declared: dict[str, S.Setting]) -> None:
    """A new run's settings (``values`` by name; ``declared``: their declarations) that its ``--method``
    leaves unread, at other than their default (MAE's decoder under LoMaR), refused. A resumed run is not checked
    again: it keeps what it started with."""
    method = values.get("method")
    if method not in names():  # reported by validate
        return
    readers: dict[str, list[str]] = {}
    for name in names():
        for setting in get_method(name).reads:
            readers.setdefault(setting, []).append(name)
    for name in (name for name in readers if name not in get_method(method).reads):
        if (value := values.get(name, declared[name].default)) != declared[name].default:
            typed = S.as_typed(declared[name].name_flag(name), value)
            raise ConfigError(f"{typed} is for --method {' and '.join(readers[name])} only (got --method {method}); "
                              f"drop it")


def refuse_training_settings(config: Any, explicit: dict[str, Any], names: tuple[str, ...]) -> None:
    """--eval-only trains nothing: a flag among ``names`` (the command's training settings) would go unread; refused.
    The same settings from a --config file pass: a run's own config.yaml, reused to score the run, holds them all.
    Not without --pretrained: that is the error to fix first."""
    if not (config.eval_only and config.pretrained):
        return
    given = [name for name in names if name in explicit and source_of(config, name) is None]
    if given:
        declared = S.declarations(type(config))
        flags = ", ".join(S.as_typed(declared[name].name_flag(name), explicit[name]) for name in given)
        one = len(given) == 1
        raise ConfigError(f"{flags} {'is a training setting' if one else 'are training settings'}, and --eval-only "
                          f"trains nothing; drop {'it' if one else 'them'}, or drop --eval-only to train")


def check_fsdp(config: Any) -> None:
    """--fsdp shards across torchrun processes; refuse what the sharded path does not do. A resume of a sharded run
    may go on in one process (FSDP over it alone: :func:`lomar.train.fsdp.shard_model`), its state read onto it."""
    if not config.fsdp:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 and config.resume_point is None:
        raise ConfigError("--fsdp shards the model across processes but this is a single process; launch with "
                          "torchrun --nproc-per-node N (N >= 2), or drop --fsdp")
    if config.precision == "fp16":
        raise ConfigError("--precision fp16 is not supported with --fsdp (its loss scaling is not wired for "
                          "sharded gradients); use --precision bf16 or fp32")
    if config.knn_every:
        raise ConfigError("--knn-every is not supported with --fsdp (the encoder is sharded); set --knn-every 0 "
                          "and run `lomar knn` on RUN/last.pt")


def check_data(data: str) -> None:
    """A folder or .txt list that exists, or a tar shard pattern that matches."""
    from lomar.data.shards import is_shard_pattern, shard_paths  # torch: not for --help

    if is_shard_pattern(data):
        try:
            shard_paths(data)
        except ValueError as exc:
            raise ConfigError(f"--data: {exc}") from None
    elif glob.has_magic(data) or "{" in data:
        if not Path(data).exists():  # a folder may have [ or { in its name
            raise ConfigError(f"--data {data}: a pattern must name .tar shards, e.g. shards/*.tar; "
                              f"for images pass their folder")
    elif not Path(data).exists():
        raise ConfigError(f"--data {data} does not exist; pass a folder of images, a .txt list "
                          f"or a tar shard pattern, or omit --data for the demo")


def parse_share(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--cpu-decode-share must be auto or a share in [0, 1], e.g. 0.3; got {text!r}") from None


# What knn, linprobe and finetune take of --decode (their Setting.takes): the declaration is pretrain's, whose windows
# and gpu make its training crops, not an evaluation's or the finetune recipe's
EVAL_DECODES = ("full", "draft")


def check_decode(config: Any, patch_size: int) -> None:
    """--decode other than full reads image files one by one; windows needs windows and a method that reads nothing
    else with the run's settings and ``patch_size`` (:meth:`lomar.methods.base.Method.reads_outside_windows`), gpu a
    GPU."""
    if config.cpu_decode_share != "auto" and config.decode != "gpu":
        raise ConfigError(f"--cpu-decode-share {config.cpu_decode_share:g} shares --decode gpu's photos with the "
                          f"workers, but this run is --decode {config.decode}; drop it, or use --decode gpu")
    if config.gpu_decoder != "torchvision" and config.decode != "gpu":
        raise ConfigError(f"--gpu-decoder {config.gpu_decoder} decodes --decode gpu's photos, but this run is "
                          f"--decode {config.decode}; drop it, or use --decode gpu")
    if config.decode == "full":
        return
    from lomar.data.shards import is_shard_pattern  # torch: not for --help

    if config.data is not None and is_shard_pattern(config.data):
        raise ConfigError(f"--decode {config.decode} reads image files, not tar shards (--data {config.data}); "
                          f"use --decode full with shards")
    if config.decode == "windows" and not config.windows:
        raise ConfigError(f"--decode windows resamples only the windows' pixels, but this run is --method "
                          f"{config.method} with --windows 0, which reads the whole crop; pass --windows N (local "
                          f"windows), or use --decode draft")
    if config.decode == "windows":
        try:
            outside = get_method(config.method).reads_outside_windows(config, patch_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if outside is not None:
            raise ConfigError(f"--decode windows resamples only the windows' pixels, but --method {config.method} "
                              f"{outside}; use --decode draft")
    if config.decode == "gpu" and config.device != "auto" and not config.device.startswith("cuda"):
        raise ConfigError(f"--decode gpu decodes JPEGs on a CUDA device, not --device {config.device}; "
                          f"use --decode draft on CPU")
    if config.gpu_decoder == "nvimgcodec":
        from lomar.data.gpu_jpeg import nvimgcodec_missing  # torch: not for --help

        if missing := nvimgcodec_missing():
            raise ConfigError(f"--gpu-decoder nvimgcodec: {missing}")


def refuse_contradictions(explicit: dict[str, Any], own: dict[str, Any], names, whose: str, source,
                          agrees=lambda name, given: False) -> None:
    """--eval-only's model keeps its own settings ``names`` (``own``, as saved in ``source``): one given otherwise
    (``explicit``) is refused, naming both values; ``agrees(name, given)``: a given value that asks for the model's
    own anyway (segment's --rel-pos auto)."""
    for name in (n for n in names if n in explicit and n in own):
        if explicit[name] != own[name] and not agrees(name, explicit[name]):
            flag, (given, its) = "--" + name.replace("_", "-"), (
                "none" if v is None else S.shown(v) for v in (explicit[name], own[name]))
            raise ConfigError(f"{flag} {given} differs from the {whose}'s own ({its}) in {source}; drop {flag}")


def check_eval_only_model(config: Any, found: Any, model: str) -> None:
    """--eval-only's --pretrained: given, there, and a `lomar COMMAND` run or checkpoint (``found``: what the command's
    complete() read of it; ``model``: what such a run trains, as the refusal names it)."""
    if not config.pretrained:
        raise ConfigError(f"--eval-only needs --pretrained RUN (a `lomar {config.COMMAND}` run folder or checkpoint)")
    check_pretrained(config)
    if found is None and is_probe_file(config.pretrained):
        predict = command_line("lomar", "predict", config.pretrained, "IMAGES")
        raise ConfigError(f"--pretrained {config.pretrained} is a `lomar linprobe --save` file, not a `lomar "
                          f"{config.COMMAND}` run or checkpoint: `{predict}` runs it on images, and lomar.load_model "
                          f"rebuilds it in Python")
    if found is None:
        raise ConfigError(f"--pretrained {config.pretrained} is not a `lomar {config.COMMAND}` run or checkpoint; "
                          f"--eval-only scores a trained {model}")


def check_warmup(config: Any) -> None:
    """The warm-up within the run: the one bound a training command's settings set each other."""
    if config.warmup_epochs < 0:
        raise ConfigError(f"--warmup-epochs must be >= 0, got {config.warmup_epochs}")
    if config.warmup_epochs > config.epochs:
        fix = (f"a resumed run keeps its warm-up: pass --epochs {config.warmup_epochs:g} or more, and --max-steps N "
               f"to stop sooner" if getattr(config, "resume", None) else "lower --warmup-epochs or raise --epochs")
        raise ConfigError(f"--warmup-epochs must be in [0, --epochs {config.epochs}], got {config.warmup_epochs}; "
                          f"{fix}")


def check_min_lr(config: Any) -> None:
    """``--min-lr`` at most the peak lr (``--lr``, or the one ``--blr`` gives): above it, the cosine would rise."""
    if getattr(config, "lr", None) is not None and config.min_lr > config.lr:
        raise ConfigError(f"--min-lr {config.min_lr} is above --lr {config.lr}; lower --min-lr")
    if config.min_lr > (peak := peak_lr(config, int(os.environ.get("WORLD_SIZE", "1")))):  # the lr --blr gives
        raise ConfigError(f"--min-lr {config.min_lr:g} is above the peak lr {peak:.3g} (--blr {config.blr:g} x "
                          f"effective batch / 256): the lr would rise to it; lower --min-lr or raise --blr")
