"""Any checkpoint -> a model, and a model -> our pretraining checkpoint (``lomar load-original``).

:func:`load_model` reads every format the project meets:

- our pretraining checkpoint (``last.pt``: ``{"model": LoMaR/MAE state, "config": {...}}``),
  including one converted by ``lomar load-original``;
- a classifier or encoder checkpoint with our key names (``{"model": state, ...}``; the
  architecture is read off the weights' shapes, with ``vit_config``/``config`` as hints);
- a folder written by ``lomar export`` (``config.json`` + safetensors);
- an original LoMaR / MAE pretraining or finetuned checkpoint (via :func:`lomar.load_original`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from lomar.checkpoints.io import load_original, safe_load
from lomar.models.vit import MODEL_SIZES, PATCH_SIZES, ViTConfig, VisionTransformer

__all__ = ["load_model", "encoder_of", "pretrain_checkpoint"]

PRETRAIN_FORMAT = "lomar-pretrain-1"
CLASSIFIER_FORMAT = "lomar-classifier-1"


# ---- reading -------------------------------------------------------------------------------
def _is_pretrain(data: dict, state: dict) -> bool:
    return isinstance(data.get("config"), dict) and any(k.startswith("encoder.") for k in state)


def _from_pretrain(data: dict) -> nn.Module:
    from lomar.train.config import PretrainConfig, build_model

    known = set(PretrainConfig.__dataclass_fields__)
    config = PretrainConfig(**{k: v for k, v in data["config"].items() if k in known})
    model = build_model(config)
    model.load_state_dict(data["model"], strict=True)
    return model


def _is_ours(state: dict) -> bool:
    """Encoder/classifier keys as in :class:`VisionTransformer`: not the original's RPE names, no
    pretraining parts (an original MAE classifier has the same keys as ours and is read here too)."""
    return "patch_embed.proj.weight" in state and not any(
        ".rpe_k." in k or k.startswith(("mask_token", "decoder_", "encoder_pred.")) for k in state)


def _vit_from_state(state: dict, hints: dict, overrides: dict) -> VisionTransformer:
    """Rebuild a VisionTransformer from the shapes of its weights."""
    weight = state["patch_embed.proj.weight"]
    dim, in_chans, patch = weight.shape[0], weight.shape[1], weight.shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    rpe_key = "blocks.0.attn.rpe.table"
    heads = overrides.get("num_heads") or (dim // state[rpe_key].shape[1] if rpe_key in state else None)
    heads = heads or hints.get("num_heads")
    heads = heads or {(d, n): h for d, n, h in MODEL_SIZES.values()}.get((dim, depth))
    if not heads:
        raise ValueError(f"cannot tell the number of heads of this {dim}-wide, {depth}-deep encoder; "
                         f"pass --num-heads")
    pos = "rpe" if rpe_key in state else "abs" if "pos_embed" in state else "none"
    img_size = overrides.get("img_size") or hints.get("img_size") or hints.get("input_size")
    if not img_size and "pos_embed" in state:
        img_size = int(round((state["pos_embed"].shape[1] - 1) ** 0.5)) * patch
    config = ViTConfig(img_size=int(img_size or 224), patch_size=patch, in_chans=in_chans, embed_dim=dim,
                       depth=depth, num_heads=int(heads), mlp_ratio=mlp_ratio, pos=pos)
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    model = VisionTransformer(config, num_classes=num_classes)
    if pos == "abs" and "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        state = {k: v for k, v in state.items() if k != "pos_embed"}  # fixed sin-cos: ours is equal
    if num_classes:  # a classifier pools un-normed tokens into fc_norm: it has no final norm
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"pos_embed"}:
        raise ValueError(f"weights do not fit the inferred {dim}-wide, {depth}-deep encoder: "
                         f"missing {missing}, unexpected {unexpected}")
    return model


def load_model(path: str | Path, **overrides) -> nn.Module:
    """A :class:`LoMaR`, :class:`MAE` or :class:`VisionTransformer` from any checkpoint or export.

    ``overrides`` (``num_heads``, ``img_size``, ``window_size``, ``num_windows``,
    ``decoder_num_heads``) fill in what an original checkpoint cannot tell. Raises ValueError
    or FileNotFoundError with a message that names the problem.
    """
    from lomar.checkpoints.export import CONFIG_NAME, create_encoder

    path = Path(path)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} is a folder without {CONFIG_NAME}; pass a checkpoint file or an "
                             f"exported folder")
        return create_encoder(path, **{k: v for k, v in overrides.items() if k in ViTConfig.__dataclass_fields__})
    data = safe_load(path)
    state = data.get("model", data)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} has no state dict under 'model'")
    if _is_pretrain(data, state):
        return _from_pretrain(data)
    if _is_ours(state):
        hints = {}
        for key in ("config", "vit_config", "args"):
            value = data.get(key)
            hints.update(vars(value) if isinstance(value, argparse.Namespace) else
                         value if isinstance(value, dict) else {})
        hints = {k: v for k, v in hints.items() if k in ("num_heads", "img_size", "input_size")
                 and isinstance(v, int)}
        return _vit_from_state(state, hints, overrides)
    return load_original(path, **overrides)


def encoder_of(model: nn.Module) -> VisionTransformer:
    """The encoder of a LoMaR / MAE model, or the VisionTransformer itself."""
    encoder = getattr(model, "encoder", model)
    if not isinstance(encoder, VisionTransformer):
        raise TypeError(f"{type(model).__name__} has no ViT encoder")
    return encoder


# ---- writing -------------------------------------------------------------------------------
def pretrain_checkpoint(model: nn.Module, source: str | None = None) -> dict:
    """Our checkpoint of a LoMaR / MAE model: ``{"model", "config", "format", "source"}``.

    ``config`` is a full pretraining config (``lomar pretrain`` flags), so the checkpoint is
    readable by ``lomar export``, ``lomar visualize`` and ``--pretrained``. A classifier is
    written as ``{"model", "vit_config", "num_classes", "format": "lomar-classifier-1"}``.
    """
    from lomar.train.config import PretrainConfig, build_model
    from lomar.models import MAE, LoMaR

    vit = encoder_of(model).config
    if isinstance(model, VisionTransformer):
        return {"model": model.state_dict(), "vit_config": vit.to_dict(), "num_classes": model.num_classes,
                "format": CLASSIFIER_FORMAT, "source": source}
    if vit.mlp_ratio != 4.0 or vit.in_chans != 3:
        raise ValueError(f"only MLP ratio 4 and 3 input channels can be described by a pretraining config "
                         f"(got {vit.mlp_ratio}, {vit.in_chans})")
    shape = (vit.embed_dim, vit.depth, vit.num_heads)
    size = next((s for s, v in MODEL_SIZES.items() if v == shape), "base")
    patch = vit.patch_size if vit.patch_size in PATCH_SIZES else 16
    values = dict(model=f"vit_{size}_patch{patch}", embed_dim=vit.embed_dim, depth=vit.depth,
                  num_heads=vit.num_heads, patch_size=vit.patch_size, img_size=vit.img_size, pos=vit.pos,
                  norm_pix_loss=model.norm_pix_loss, mask_ratio=model.mask_ratio)
    if isinstance(model, LoMaR):
        values.update(method="lomar", window_size=model.window_size, windows=model.num_windows)
    elif isinstance(model, MAE):
        settings = model.decoder_settings
        values.update(method="mae", decoder_embed_dim=settings["decoder_embed_dim"],
                      decoder_depth=settings["decoder_depth"], decoder_num_heads=settings["decoder_num_heads"])
    else:
        raise TypeError(f"cannot write a pretraining checkpoint for {type(model).__name__}")
    config = PretrainConfig(**values)
    state = model.state_dict()
    build_model(config).load_state_dict(state, strict=True)  # proves the checkpoint rebuilds
    return {"model": state, "config": config.to_dict(), "format": PRETRAIN_FORMAT, "source": source}
