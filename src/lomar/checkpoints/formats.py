"""Every checkpoint format lomar reads: detected once, one reader per format.

:func:`read` loads a path, asks each registered :class:`~lomar.checkpoints.reader.Reader` in
priority order whether the contents are its format, and returns a ``Source``. A reader turns a
source into a full model (:meth:`Reader.model`, for ``export``/``visualize``) or into encoder
weights with our key names (:meth:`Reader.encoder`, for finetuning and probes). Our formats are
here; the original code's in :mod:`~lomar.checkpoints.original`, BEiT's in
:mod:`~lomar.checkpoints.formats_beit`. Priorities run from 5 (BEiT's, whose keys overlap ours)
over 10 (ours) to 90 (the original-LoMaR fallback).

A pretraining checkpoint holds a ``model_spec`` (:mod:`lomar.models.spec`), which rebuilds the
model without training code; checkpoints written before it are read from their saved settings.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

import lomar.checkpoints.formats_beit  # noqa: F401  registers the BEiT readers
from lomar.checkpoints.export import CONFIG_NAME, create_encoder
from lomar.checkpoints.io import safe_load
from lomar.checkpoints.keys import (
    CLASSIFIER_PREFIXES,
    ENCODER_PREFIXES,
    PRETRAIN_ONLY,
    args_dict,
    classifier_from_original,
    drop_final_norm,
    encoder_keys,
    infer_vit_config,
    lomar_from_original,
    lomar_to_original,
    mae_from_original,
    rename_rpe,
)
from lomar.checkpoints.original import infer_original_config, load_original
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
from lomar.models.vit import VisionTransformer, ViTConfig

__all__ = ["Source", "EncoderWeights", "Reader", "register", "readers", "read", "load_model", "encoder_weights",
           "load_original", "infer_original_config", "infer_vit_config", "lomar_from_original", "lomar_to_original",
           "mae_from_original", "classifier_from_original", "encoder_keys", "drop_final_norm", "rename_rpe",
           "saved_settings", "pretrain_spec",
           "PRETRAIN_FORMAT", "CLASSIFIER_FORMAT", "CLASSIFIER_PREFIXES", "ENCODER_PREFIXES", "PRETRAIN_ONLY"]


def _hints(data: dict) -> dict:
    hints = args_dict(data, ("config", "vit_config", "args"))
    return {k: v for k, v in hints.items() if k in ("num_heads", "img_size", "input_size") and isinstance(v, int)}


def _saved_windows(config: ViTConfig, data: dict) -> ViTConfig:
    """``config`` (inferred from shapes) with the ViTDet windows of the ViTConfig a classifier
    checkpoint saved (``lomar finetune``: ``config``, :func:`pretrain_checkpoint`: ``vit_config``):
    no shape tells them, and the same weights with global attention are another model."""
    for key in ("config", "vit_config"):
        saved = data.get(key)
        if isinstance(saved, dict) and "global_blocks" in saved:  # a PretrainConfig has none
            return replace(config, window_size=saved.get("window_size", 0), global_blocks=saved["global_blocks"])
    return config


class PretrainReader(Reader):
    """Ours: ``lomar pretrain`` / ``load-original`` output of LoMaR or MAE: ``{"model", "model_spec",
    "config"}`` (checkpoints before ``model_spec``: their ``config`` settings)."""

    name = "lomar-pretrain"

    def detect(self, data, state):
        return isinstance(data.get("model_spec") or data.get("config"), dict) and any(
            k.startswith("encoder.") for k in state)

    def model(self, src, overrides):
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
        config = _saved_windows(infer_vit_config(src.state, _hints(src.data), **overrides), src.data)
        state = src.state
        num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
        model = VisionTransformer(config, num_classes=num_classes)
        if config.pos == "abs" and state["pos_embed"].shape != model.pos_embed.shape:
            state = {k: v for k, v in state.items() if k != "pos_embed"}  # fixed sin-cos: ours is equal
        if num_classes:
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
        config = _saved_windows(infer_vit_config(src.state, _hints(src.data), **overrides), src.data)
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


def read(path: str | Path) -> tuple[Reader, Source]:
    """Load ``path`` once and find its reader. Raises FileNotFoundError or ValueError naming the problem."""
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():  # a sharded `lomar pretrain --fsdp` checkpoint
        data = read_sharded(path)
    elif path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} is a folder without {CONFIG_NAME}; pass a checkpoint file or a folder "
                             f"written by `lomar export` / `lomar pretrain`")
        reader = next(r for r in readers() if r.detect_folder(path))
        return reader, Source(path, reader.name, {}, {})
    else:
        data = safe_load(path)
    state = data.get("model", data)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state dict (a dict of tensors) under 'model'")
    for reader in readers():
        if reader.detect(data, state):
            return reader, Source(path, reader.name, data, state)
    sample = ", ".join(sorted(state)[:4]) or "no tensors"
    raise ValueError(f"checkpoint {path} is in no format lomar reads (keys: {sample}, ...); expected ours "
                     f"(lomar pretrain / finetune / export) or an original LoMaR / MAE / BEiT checkpoint")


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
