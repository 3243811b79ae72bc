"""Every checkpoint format lomar reads: detected once, one reader per format.

:func:`read` loads a path, asks each registered :class:`~lomar.checkpoints.reader.Reader` in
priority order whether the contents are its format, and returns a ``Source``. A reader turns a
source into a full model (:meth:`Reader.model`, for ``export``/``visualize``) or into encoder
weights with our key names (:meth:`Reader.encoder`, for finetuning and probes). Our formats and
BEiT's are here; the original code's in :mod:`~lomar.checkpoints.original`. Priorities run from 5
(BEiT's, whose keys overlap ours) over 10 (ours) to 90 (the original-LoMaR fallback).

A pretraining checkpoint holds a ``model_spec`` (:mod:`lomar.models.spec`), which rebuilds the
model without training code; checkpoints written before it are read from their saved settings.

A BEiT reader (our pretraining ``last.pt``, a BEiT export folder, an original BEiT pretraining
checkpoint) gives the full pretraining :class:`~lomar.models.beit.BEiT` (:meth:`Reader.model`) and,
for finetuning and probes, :meth:`BEiTReader.timm_weights`: the encoder in timm's ``Beit`` layout
with the relative position bias per block, each block's table initialised from the shared
pretraining one (BEiT's finetuning recipe), mask token and ``lm_head`` dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import lomar.checkpoints.original  # noqa: F401  registers the original-LoMaR/MAE readers
from lomar.checkpoints.export import CONFIG_NAME, create_encoder
from lomar.checkpoints.export_beit import read_beit_export, timm_beit_args
from lomar.checkpoints.export_leftovers import interrupted_export
from lomar.checkpoints.file_names import BEST, ENCODER_WEIGHTS, LAST, RUN_ENCODER
from lomar.checkpoints.io import safe_load
from lomar.checkpoints.keys import args_dict, drop_final_norm, infer_vit_config
from lomar.checkpoints.keys_beit import beit_to_timm, load_original_beit
from lomar.checkpoints.kinds import FINETUNE_FORMAT, classifier_pool, run_command
from lomar.checkpoints.reader import (
    CLASSIFIER_FORMAT,
    PRETRAIN_FORMAT,
    EncoderWeights,
    Reader,
    Source,
    build_strict,
    pretrain_spec,
    readers,
    register,
    saved_settings,
)
from lomar.checkpoints.sharded import read_sharded
from lomar.models.beit import BEiT, BEiTConfig
from lomar.models.masking import grid_size
from lomar.models.vit import VisionTransformer, ViTConfig
from lomar.values import is_size

__all__ = ["Source", "EncoderWeights", "Reader", "register", "readers", "read", "holds_beit", "peek_encoder",
           "load_model", "encoder_weights", "stopped_run_checkpoint",
           "saved_settings", "PRETRAIN_FORMAT", "CLASSIFIER_FORMAT", "BEiTReader", "BEiTPretrainReader",
           "BEiTExportReader", "OriginalBEiTReader", "BEiTFinetuneReader", "TimmBeitWeights"]


def _inferred_config(src: Source, overrides: dict) -> ViTConfig:
    """The encoder's config from its shapes and saved sizes, with the ViTDet windows of the ViTConfig a
    classifier checkpoint saved (``lomar finetune``: ``config``, :func:`pretrain_checkpoint`: ``vit_config``):
    no shape tells them, and the same weights with global attention are another model."""
    hints = args_dict(src.data, ("config", "vit_config", "args"))
    hints = {k: v for k, v in hints.items() if k in ("num_heads", "img_size", "input_size") and is_size(v)}
    config = infer_vit_config(src.state, hints, **overrides)
    for key in ("config", "vit_config"):
        saved = src.data.get(key)
        if isinstance(saved, dict) and "global_blocks" in saved:  # a PretrainConfig has none
            return replace(config, window_size=saved.get("window_size", 0), global_blocks=saved["global_blocks"])
    return config


def _unknown_grid(src: Source) -> ValueError:
    """A non-square table without a saved size, to be resampled: an export keeps the (height, width) given it."""
    return ValueError(f"{src.path}: its position table holds {src.state['pos_embed'].shape[1] - 1} patches, not a "
                      f"square grid, and it saves no image size to resample it from; record the size it was trained "
                      f"at first: lomar export {src.path} --img-size HEIGHT WIDTH --to DIR, and read DIR")


class PretrainReader(Reader):
    """Ours: ``lomar pretrain`` / ``load-original`` output of LoMaR or MAE: ``{"model", "model_spec",
    "config"}`` (checkpoints before ``model_spec``: their ``config`` settings)."""

    name = "lomar-pretrain"

    def detect(self, data, state):
        return isinstance(data.get("model_spec") or data.get("config"), dict) and any(
            k.startswith("encoder.") for k in state)

    def model(self, src, overrides):
        if overrides:  # what they fill in, this checkpoint says itself: taking them silently would mislead
            raise ValueError(f"{src.path} is a lomar pretraining checkpoint and carries its own settings; drop "
                             f"{', '.join(f'{k}=...' for k in sorted(overrides))} (settings for original checkpoints)")
        return build_strict(pretrain_spec(src), src.state, src.path)

    def encoder(self, src, overrides):
        spec = pretrain_spec(src)
        state = {k.removeprefix("encoder."): v for k, v in src.state.items() if k.startswith("encoder.")}
        dropped = [k for k in src.state if not k.startswith("encoder.")]  # mask token, pixel head, decoder
        method = "mae" if ".mae" in spec["arch"] else "lomar" if ".lomar:" in spec["arch"] else spec["arch"]
        return EncoderWeights(ViTConfig.from_dict(spec["config"]), state, dropped, f"pretrain checkpoint ({method})")


# Every key a VisionTransformer (encoder or classifier) has, and nothing else.
_VIT_KEY = re.compile(r"^(cls_token|pos_embed|(patch_embed\.proj|norm|fc_norm|head)\.(weight|bias)|blocks\.\d+\."
                      r"((norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|attn\.rpe\.table))$")


class VitReader(Reader):
    """Ours: a classifier, encoder or ``lomar finetune`` checkpoint (VisionTransformer key names).

    An original MAE finetuned classifier has the same keys and is read here too."""

    name = "lomar-vit"

    def detect(self, data, state):
        return "patch_embed.proj.weight" in state and all(_VIT_KEY.match(k) for k in state)

    def model(self, src, overrides):
        config = _inferred_config(src, overrides)
        state = src.state
        num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
        pool = classifier_pool(src.data, state) if num_classes else src.data.get("global_pool") or "avg"
        model = VisionTransformer(config, num_classes=num_classes, global_pool=pool)
        if config.pos == "abs" and ("img_size" in overrides or state["pos_embed"].shape != model.pos_embed.shape):
            # resampled from the saved grid (untouched at it), as every loader does
            try:
                saved = _inferred_config(src, {k: v for k, v in overrides.items() if k != "img_size"})
            except ValueError:  # no size saved and a non-square table: img_size named the table's own grid
                if state["pos_embed"].shape != model.pos_embed.shape:  # img_size is the size to resample to
                    raise _unknown_grid(src) from None
                saved = config
            source = grid_size(saved.img_size, saved.patch_size)
            state = {**state, "pos_embed": model.fit_pos_embed(state["pos_embed"], source)}
        if num_classes and pool == "avg":
            state, _ = drop_final_norm(state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"pos_embed"}:
            raise ValueError(f"weights do not fit the inferred {config.embed_dim}-wide, {config.depth}-deep "
                             f"encoder: missing {missing}, unexpected {unexpected}")
        return model

    def encoder(self, src, overrides):
        saved = src.data.get("config")
        if isinstance(saved, dict) and "embed_dim" in saved:  # a finetune checkpoint keeps its ViTConfig
            return EncoderWeights(ViTConfig.from_dict(saved), dict(src.state), [], "finetune checkpoint")
        try:
            config = _inferred_config(src, overrides)
        except ValueError as exc:  # a caller's img_size is the size to resample to, not the table's
            raise _unknown_grid(src) if "not a square grid" in str(exc) else exc from None
        return EncoderWeights(config, dict(src.state), [], "classifier checkpoint")


class ExportReader(Reader):
    """Ours: a folder written by ``lomar export`` or ``lomar pretrain`` (config.json + safetensors)."""

    name = "export"

    def detect_folder(self, path):
        return True

    def model(self, src, overrides):
        # window_size here is the command line's LoMaR window (K), not the export's ViTDet windows
        fields = set(ViTConfig.__dataclass_fields__) - {"window_size"}
        return create_encoder(src.path, **{k: v for k, v in overrides.items() if k in fields})

    def encoder(self, src, overrides):
        encoder = create_encoder(src.path)
        return EncoderWeights(encoder.config, encoder.state_dict(), [], "exported folder")


register(PretrainReader(), 10)
register(VitReader(), 20)
register(ExportReader(), 30)


# ---- BEiT --------------------------------------------------------------------------------------
@dataclass
class TimmBeitWeights:
    """A BEiT encoder as timm ``Beit(**timm_args)`` (no classifier) and its state dict under timm keys."""

    config: BEiTConfig  # of the pretraining model
    timm_args: dict
    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)  # source keys the encoder does not use
    source: str = ""


class BEiTReader(Reader):
    """A BEiT format: subclasses give :meth:`model` (our :class:`BEiT`, weights loaded)."""

    source = ""  # what :class:`TimmBeitWeights` names as its source

    def timm_weights(self, src: Source, overrides: dict) -> TimmBeitWeights:
        beit = self.model(src, overrides)
        state = beit.state_dict()
        timm_state = beit_to_timm(state, per_block=True)
        dropped = sorted(k for k in state if k.startswith(("lm_head.", "mask_token")))
        return TimmBeitWeights(beit.config, timm_beit_args(beit), timm_state, dropped, self.source)

    def encoder(self, src: Source, overrides: dict) -> EncoderWeights:
        raise ValueError(f"{src.path} holds a BEiT encoder, which has no VisionTransformer form; load it with "
                         f"lomar.eval.features.load_pretrained_encoder (a timm Beit)")


class BEiTPretrainReader(BEiTReader):
    """Ours: ``lomar pretrain --method beit`` output, ``{"model": BEiTPretrain state ('beit.*'), "config"}``."""

    name, source = "lomar-pretrain-beit", "pretrain checkpoint (beit)"

    def detect(self, data, state):
        config = data.get("config")
        return isinstance(config, dict) and config.get("method") == "beit" and any(k.startswith("beit.") for k in state)

    def model(self, src, overrides):
        if "beit.lm_head.weight" not in src.state:
            raise ValueError(f"{src.path}: BEiT checkpoint without beit.lm_head.weight; it is incomplete")
        return build_strict(pretrain_spec(src), src.state, src.path)


class BEiTExportReader(BEiTReader):
    """A folder from ``lomar export`` / ``lomar pretrain --method beit``: config.json ("method": "beit")."""

    name = "export-beit"

    def detect_folder(self, path: Path) -> bool:
        try:
            return json.loads((path / CONFIG_NAME).read_text()).get("method") == "beit"
        except (OSError, ValueError, AttributeError, RecursionError):  # not ours to report: the export reader does
            return False

    def model(self, src, overrides):
        weights = self.timm_weights(src, overrides)  # validated: the shapes are those of BEiT(weights.config)
        model = BEiT(weights.config)
        state = {k: v for k, v in weights.state.items() if ".attn.relative_position_bias_table" not in k}
        if model.config.use_shared_rel_pos_bias:
            shared = weights.state["blocks.0.attn.relative_position_bias_table"]
            state["rel_pos_bias.relative_position_bias_table"] = shared
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"mask_token", "lm_head.weight", "lm_head.bias"}:
            raise ValueError(f"{src.path} does not fit BEiT: missing {missing}, unexpected {unexpected}")
        return model

    def timm_weights(self, src, overrides):
        # The export holds per-block tables, all equal to the shared one it was written from. Validated before
        # anything is read or built: a small export whose config claims huge widths allocates nothing.
        config, args, weights = read_beit_export(src.path)
        return TimmBeitWeights(config, args, load_file(str(weights)), [], "exported folder (beit)")


class OriginalBEiTReader(BEiTReader):
    """The original BEiT code's pretraining checkpoint (``{'model': sd}``; lm_head, mask_token)."""

    name, source = "original-beit", "original checkpoint (beit)"

    def detect(self, data, state):
        return "lm_head.weight" in state and "mask_token" in state and "blocks.0.attn.qkv.weight" in state

    def model(self, src, overrides):
        return load_original_beit(src.path, **{k: v for k, v in overrides.items() if k == "num_heads"})


class BEiTFinetuneReader(BEiTReader):
    """A ``lomar finetune`` checkpoint of a BEiT encoder: recognised, and refused with the way out."""

    name = "lomar-finetune-beit"

    def detect(self, data, state):
        config = data.get("config")
        return data.get("format") == FINETUNE_FORMAT and isinstance(config, dict) and "vocab_size" in config

    def model(self, src, overrides):
        raise ValueError(f"{src.path} is a finetuned BEiT classifier, which lomar does not read back yet; load "
                         f"its 'model' state into timm.models.beit.Beit, or pass the BEiT pretraining checkpoint")

    timm_weights = model


# Before our own formats (a BEiT last.pt also has a "config"; a BEiT export is a config.json
# folder too), and before the original-LoMaR/MAE fallbacks, whose keys a BEiT checkpoint shares.
register(BEiTPretrainReader(), 5)
register(BEiTFinetuneReader(), 6)
register(BEiTExportReader(), 25)
register(OriginalBEiTReader(), 60)


def _export_folder_of(path: Path) -> Path | None:
    """The export folder whose config.json names the file ``path`` as its weights, else None. Read alone, such a
    file loses what only config.json says (the image size an RPE encoder was trained at, its ViTDet windows), and
    a BEiT export's weights are in no checkpoint format."""
    config = path.parent / CONFIG_NAME
    if path.suffix != ".safetensors" or not path.is_file() or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError, RecursionError):  # not an export's: the file is read on its own
        return None
    if not isinstance(data, dict):
        return None
    beit = data.get("method") == "beit"
    if not beit and not str(data.get("architecture", "")).startswith("lomar_"):
        return None
    return path.parent if data.get("weights", RUN_ENCODER if beit else ENCODER_WEIGHTS) == path.name else None


def read(path: str | Path, mmap: bool = False) -> tuple[Reader, Source]:
    """Load ``path`` once and find its reader (``mmap``: map a checkpoint's tensors instead of reading them, enough
    to tell its format). Raises FileNotFoundError or ValueError naming the problem."""
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():  # a sharded `lomar pretrain --fsdp` checkpoint
        data = read_sharded(path)
    elif path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            # a run folder without an export (finetune's, or a stopped pretraining): name the checkpoints it keeps
            kept = " or ".join(str(path / name) for name in (BEST, LAST) if (path / name).is_file())
            raise ValueError(f"{path} is a folder without {CONFIG_NAME}; {interrupted_export(path)}pass " + (
                f"its checkpoint, {kept}" if kept else "a checkpoint file or a folder written by `lomar export` / "
                                                      "`lomar pretrain`"))
        reader = next(r for r in readers() if r.detect_folder(path))
        return reader, Source(path, reader.name, {}, {})
    elif (folder := _export_folder_of(path)) is not None:  # an export's weights file: read with what its folder says
        return read(folder)
    else:
        data = safe_load(path, mmap=mmap)
    state = data.get("model", data)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state dict (a dict of tensors) under 'model'")
    for reader in readers():
        if reader.detect(data, state):
            return reader, Source(path, reader.name, data, state)
    if (dense := run_command(data)) in ("detect", "segment"):  # its encoder is inside, but no command reads it out
        raise ValueError(f"checkpoint {path} is a whole `lomar {dense}` model, not an encoder; pass the encoder that "
                         f"run started from (its --pretrained), or a pretraining checkpoint or export")
    sample = ", ".join(sorted(state)[:4]) or "no tensors"
    raise ValueError(f"checkpoint {path} is in no format lomar reads (keys: {sample}, ...); expected ours "
                     f"(lomar pretrain / finetune / export) or an original LoMaR / MAE / BEiT checkpoint")


def holds_beit(path: str | Path) -> bool:
    """Whether ``path`` holds a BEiT encoder (False for one that cannot be read: it is reported where it is read)."""
    for mmap in (True, False):  # a checkpoint in torch's legacy (non-zip) format cannot be mapped
        try:
            return isinstance(read(path, mmap=mmap)[0], BEiTReader)
        except (OSError, ValueError, RuntimeError):
            continue
    return False


def stopped_run_checkpoint(path: Path) -> Path | None:
    """The ``last.pt`` of a run folder that holds no export (a run stopped before its end writes none), the one
    checkpoint of it to read an encoder from; None for any other ``path``."""
    return path / LAST if path.is_dir() and not (path / CONFIG_NAME).exists() and (path / LAST).is_file() else None


def peek_encoder(path: str | Path) -> tuple[str, int | None] | None:
    """("beit" or "vit", its patch size or None) for the encoder ``path`` holds, told from its config.json or the
    shape of its mapped patch-embedding weight, no weight read; None where that cannot tell (a sharded or unmappable
    checkpoint, one in no format: the full read reports it), so that a caller can refuse an encoder it cannot use
    before reading one."""
    path = stopped_run_checkpoint(Path(path)) or Path(path)  # read as load_pretrained_encoder reads it
    if path.is_dir() and (path / ".metadata").is_file():
        return None
    try:
        reader, src = read(path, mmap=True)
        kind = "beit" if isinstance(reader, BEiTReader) else "vit"
        if not src.state:  # an export folder
            args = json.loads((src.path / CONFIG_NAME).read_text()).get("model_args")
            patch = args.get("patch_size") if isinstance(args, dict) else None
            return kind, patch if isinstance(patch, int) else None
    except (OSError, ValueError, RuntimeError, RecursionError, AttributeError):
        return None
    stem = next((v for k, v in src.state.items() if k.endswith("patch_embed.proj.weight") and v.ndim == 4), None)
    return kind, int(stem.shape[-1]) if stem is not None else None


def load_model(path: str | Path, **overrides) -> nn.Module:
    """A :class:`LoMaR`, :class:`MAE` or :class:`VisionTransformer` from any checkpoint or export.

    ``overrides`` (``num_heads``, ``img_size``, ``window_size``, ``num_windows``,
    ``decoder_num_heads``) fill in what an original checkpoint cannot tell. Raises ValueError
    or FileNotFoundError with a message that names the problem.
    """
    reader, src = read(path)
    return reader.model(src, {k: v for k, v in overrides.items() if v is not None})


def encoder_weights(path: str | Path, num_heads: int | None = None) -> EncoderWeights:
    """The encoder architecture and weights (VisionTransformer keys) of any checkpoint or export."""
    reader, src = read(path)
    return reader.encoder(src, {"num_heads": num_heads} if num_heads else {})
