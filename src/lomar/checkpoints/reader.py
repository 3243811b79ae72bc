"""The pieces every checkpoint format shares: a source read once, encoder weights, the reader
interface, the registry the formats add themselves to (:mod:`lomar.checkpoints.formats` asks
them in priority order) and the model spec of our pretraining checkpoints (LoMaR, MAE, BEiT)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lomar.checkpoints.file_names import CONFIG_NAME, RUN_CONFIG, RUN_ENCODER
from lomar.checkpoints.io import differences
from lomar.models.beit import BEiTConfig
from lomar.models.masking import grid_size
from lomar.models.spec import build_from_spec
from lomar.models.vit import ViTConfig, model_config
from lomar.models.windows import window_geometry
from lomar.values import as_sides, is_size

__all__ = ["Source", "EncoderWeights", "Reader", "register", "readers", "saved_settings", "pretrain_spec",
           "saved_spec", "spec_settings", "build_strict", "refuse_unused", "folder_source"]



@dataclass
class Source:
    """A checkpoint read once: its format, the raw dict and the state dict (``{}`` for an export)."""

    path: Path
    format: str
    data: dict
    state: dict


@dataclass
class EncoderWeights:
    """An encoder's architecture and weights under VisionTransformer key names."""

    config: ViTConfig
    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)  # source keys the encoder does not use
    source: str = ""  # "pretrain checkpoint (lomar)", "exported folder", "original checkpoint (mae)", ...


class Reader:
    """One checkpoint format. Subclasses set ``name`` and implement the three methods."""

    name = "?"

    def detect(self, data: dict, state: dict) -> bool:
        """Whether a loaded checkpoint (``data``, its state dict ``state``) is this format."""
        return False

    def detect_folder(self, path: Path) -> bool:
        """Whether the folder ``path`` (holding a config.json) is this format."""
        return False

    def model(self, src: Source, overrides: dict) -> nn.Module:
        raise NotImplementedError

    def encoder(self, src: Source, overrides: dict) -> EncoderWeights:
        raise NotImplementedError


# Why a reader that builds no pretraining model has no use for these of load_model's overrides.
_PRETRAINING_ONLY = {"window_size": "LoMaR's window size", "num_windows": "LoMaR's window count",
                     "decoder_num_heads": "an MAE decoder's heads"}


def refuse_unused(where: object, what: str, overrides: dict, used=(), saved: dict | None = None) -> None:
    """ValueError naming each of ``overrides`` that the reader of the checkpoint ``where`` (``what`` it holds) neither
    uses (``used``) nor finds equal to what the checkpoint ``saved``: a model built as if it were not given would
    mislead."""
    saved = saved or {}

    def same(key: str, value) -> bool:
        if key == "img_size" and is_size(value) and is_size(saved[key]):  # 224 is (224, 224)
            return as_sides(value) == as_sides(saved[key])
        return value == saved[key]

    def why(key: str) -> str:
        if key in saved:
            return f"it saved {saved[key]!r}"
        return _PRETRAINING_ONLY.get(key, "not a setting it takes")

    unused = [k for k in sorted(overrides) if k not in used and not (k in saved and same(k, overrides[k]))]
    if unused:
        raise ValueError(f"{where} is {what}; drop {', '.join(f'{k}={overrides[k]!r} ({why(k)})' for k in unused)}")


_READERS: list[tuple[int, Reader]] = []


def folder_source(path: Path, exported: str) -> str:
    """What a load report calls the export folder ``path``: "pretrain run folder (METHOD)" for a finished ``lomar
    pretrain`` run's (--pretrained takes one), whose config.json names the weights a run writes at its end beside the
    run's settings; ``exported`` for any other."""
    try:
        data = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError, RecursionError):  # its reader has read it: a folder changed since is the next read's
        return exported
    if not isinstance(data, dict) or data.get("weights") != RUN_ENCODER or not (path / RUN_CONFIG).is_file():
        return exported
    method = data.get("method")
    return "pretrain run folder" + (f" ({method})" if isinstance(method, str) and method.isidentifier() else "")


def register(reader: Reader, priority: int) -> Reader:
    """Add a reader; lower priorities are asked first (the original-LoMaR fallback is 90)."""
    _READERS.append((priority, reader))
    _READERS.sort(key=lambda item: item[0])
    return reader


def readers() -> list[Reader]:
    return [reader for _, reader in _READERS]


def saved_settings(checkpoint: dict) -> dict[str, Any]:
    """The pretraining settings a checkpoint saved, read as today's: a format-1 MAE run was global
    MAE whatever ``windows`` it recorded (the setting then applied to LoMaR only)."""
    values = dict(checkpoint["config"])
    if checkpoint.get("format", "lomar-pretrain-1") == "lomar-pretrain-1" and values.get("method") == "mae":
        values["windows"] = 0
    return values


def _spec_from_settings(settings: dict, state: dict) -> dict:
    """The model spec of a pretraining checkpoint written before specs were saved: its settings
    (``lomar pretrain`` flags, windows resolved) read as that version built the model."""
    sizes = {k: settings[k] for k in ("embed_dim", "depth", "num_heads", "patch_size") if settings.get(k) is not None}
    method, windows = settings.get("method", "lomar"), settings.get("windows")
    try:
        vit = model_config(settings["model"], img_size=settings["img_size"], pos=settings.get("pos"), **sizes)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"its saved settings do not describe a model ({exc})") from None
    if method == "beit" and "beit.lm_head.weight" in state:
        beit = BEiTConfig.from_vit(vit, state["beit.lm_head.weight"].shape[0])
        return {"arch": "lomar.models.beit:BEiT", "config": beit.to_dict(), "args": {}, "prefix": "beit."}
    if not isinstance(windows, int):
        raise ValueError(f"its saved settings hold windows={windows!r}, not a count")
    common = dict(mask_ratio=settings.get("mask_ratio"), norm_pix_loss=settings.get("norm_pix_loss", True))
    decoder = {k: settings[k] for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")}
    if method == "lomar":
        k, n = window_geometry(grid_size(vit.img_size, vit.patch_size), settings["window_size"], windows)
        args = dict(window_size=k, num_windows=n, **common)
        return {"arch": "lomar.models.lomar:LoMaR", "config": vit.to_dict(), "args": args}
    if method == "mae" and windows:
        args = dict(window_size=settings["window_size"], num_windows=windows, **decoder, **common)
        return {"arch": "lomar.models.mae_window:MAEWindow", "config": vit.to_dict(), "args": args}
    if method == "mae":
        return {"arch": "lomar.models.mae:MAE", "config": vit.to_dict(), "args": dict(**decoder, **common)}
    raise ValueError(f"its saved settings name method {method!r}, which this version does not read")


def pretrain_spec(src: Source) -> dict:
    """The model spec of one of our pretraining checkpoints (saved, or derived from its settings)."""
    spec = src.data.get("model_spec")
    try:
        return spec if isinstance(spec, dict) else _spec_from_settings(saved_settings(src.data), src.state)
    except ValueError as exc:
        raise ValueError(f"{src.path}: {exc}") from None


def saved_spec(src: Source, arch: str, what: str) -> dict:
    """The model spec ``src`` saved, which its format says is of ``arch`` (``module:Class``); ValueError naming the
    file, the model its spec names (or none) and ``what`` the file is otherwise."""
    spec = src.data.get("model_spec")
    named = spec.get("arch") if isinstance(spec, dict) else None
    if named != arch:
        raise ValueError(f"{src.path}: its model_spec names {named!r}, not {arch!r}, though {what}")
    return spec


def spec_settings(spec: dict) -> dict:
    """The settings a model spec saved (its ``config`` and ``args``), for :func:`refuse_unused`; a part that is no
    mapping gives none (:func:`build_strict` names it)."""
    return {k: v for part in (spec.get("config"), spec.get("args")) if isinstance(part, dict) for k, v in part.items()}


def build_strict(spec: dict, state: dict, path: Path) -> nn.Module:
    """The spec's model with the checkpoint's weights (under the spec's prefix), strictly. Built only once
    every shape the spec implies is that of a stored tensor: then the model is as large as the tensors
    already read (a small crafted file whose spec claims huge widths allocates nothing)."""
    prefix = spec.get("prefix", "") if isinstance(spec, dict) else ""
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    try:
        with torch.device("meta"):  # shapes without storage
            expected = {k: tuple(v.shape) for k, v in build_from_spec(spec).state_dict().items()}
    except ValueError as exc:  # a spec this version cannot build: named with the file it came in
        raise ValueError(f"{path}: {exc}") from None
    missing, unexpected = sorted(set(expected) - set(own)), sorted(set(own) - set(expected))
    wrong = sorted(f"{k} {tuple(own[k].shape)} (expected {expected[k]})" for k in set(expected) & set(own)
                   if tuple(own[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: weights do not fit its model spec ({spec['arch']}): missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, wrong shape {wrong[:2]}")
    model = build_from_spec(spec)
    try:
        model.load_state_dict(own, strict=True)
    except RuntimeError as exc:
        details = differences(exc)
        raise ValueError(f"{path}: weights do not fit its model spec ({spec['arch']}): {details[:300]}") from None
    return model
