"""Safe checkpoint loading and conversion of the original LoMaR / MAE checkpoints.

Original checkpoints are ``{'model': state_dict, 'args': argparse.Namespace, ...}``
saved with ``torch.save``. They are read with ``weights_only=True`` and only
``argparse.Namespace`` allow-listed: never a plain unpickle (SPEC §6.5).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lomar.models import MAE, LoMaR
from lomar.models.masking import grid_size, window_positions
from lomar.models.vit import MODEL_SIZES, ViTConfig, VisionTransformer

__all__ = ["atomic_save", "safe_load", "lomar_to_original", "lomar_from_original", "load_original", "infer_original_config"]

_RPE_ORIGINAL = re.compile(r"^blocks\.(\d+)\.attn\.rpe_k\.lookup_table_weight$")
_RPE_OURS = re.compile(r"^encoder\.blocks\.(\d+)\.attn\.rpe\.table$")
_ENCODER_KEYS = ("patch_embed.", "cls_token", "blocks.", "norm.", "pos_embed")


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it.

    A crash at any moment leaves either the old file or the new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def safe_load(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """``torch.load`` with ``weights_only=True``; argparse.Namespace is the one allowed class.

    ``mmap=True`` maps the tensors instead of reading them: cheap when only the small entries
    (config, step) are wanted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # corrupt, truncated, or holds disallowed objects
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read checkpoint {path}: {first}; is it a complete PyTorch "
                         f"checkpoint file?") from exc
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict")
    return data


def lomar_from_original(state: dict[str, torch.Tensor], keep_pos_embed: bool = False) -> dict[str, torch.Tensor]:
    """Original LoMaR keys -> ours. The unused ``pos_embed`` is dropped unless asked for."""
    out = {}
    for key, value in state.items():
        if key == "pos_embed" and not keep_pos_embed:
            continue
        if match := _RPE_ORIGINAL.match(key):
            out[f"encoder.blocks.{match[1]}.attn.rpe.table"] = value
        elif key.startswith("encoder_pred."):
            out["head." + key.removeprefix("encoder_pred.")] = value
        elif key.startswith(_ENCODER_KEYS):
            out["encoder." + key] = value
        else:
            out[key] = value
    return out


def lomar_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our LoMaR keys -> the original's (inverse of :func:`lomar_from_original`)."""
    out = {}
    for key, value in state.items():
        if match := _RPE_OURS.match(key):
            out[f"blocks.{match[1]}.attn.rpe_k.lookup_table_weight"] = value
        elif key.startswith("head."):
            out["encoder_pred." + key.removeprefix("head.")] = value
        else:
            out[key.removeprefix("encoder.")] = value
    return out


def _mae_from_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {("encoder." + k if k.startswith(_ENCODER_KEYS) else k): v for k, v in state.items()}


def _args_dict(data: dict) -> dict:
    args = data.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def _heads_from_name(name: str | None) -> int | None:
    if not name:
        return None
    for size, (_, _, heads) in MODEL_SIZES.items():
        if f"vit_{size}_" in name:
            return heads
    return None


def infer_original_config(data: dict, **overrides) -> tuple[str, dict]:
    """Method ('lomar', 'mae' or 'classifier') and constructor settings of an original checkpoint.

    Shapes decide what they can; ``args`` (the run's arguments) and then ``overrides``
    supply the rest. Raises ValueError naming any value that stays unknown.
    """
    state = data.get("model", data)
    args = _args_dict(data)
    if "patch_embed.proj.weight" not in state:
        raise ValueError("not an original LoMaR/MAE checkpoint: no 'patch_embed.proj.weight' in its model")
    weight = state["patch_embed.proj.weight"]
    dim, in_chans, patch = weight.shape[0], weight.shape[1], weight.shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    method = "mae" if "decoder_embed.weight" in state else "classifier" if "head.weight" in state else "lomar"
    rpe_key = "blocks.0.attn.rpe_k.lookup_table_weight"
    heads = overrides.pop("num_heads", None)
    if heads is None and rpe_key in state:
        heads = dim // state[rpe_key].shape[1]  # the shared table is (1, head_dim, 50)
    heads = heads or _heads_from_name(args.get("model"))
    if heads is None:
        standard = {d: h for (d, _, h) in MODEL_SIZES.values()}
        if (dim, depth) in {(d, n) for (d, n, _) in MODEL_SIZES.values()}:
            heads = standard[dim]
    if heads is None:
        raise ValueError(f"cannot infer the number of heads of this {dim}-wide, {depth}-deep model; "
                         f"pass num_heads=... to load_original")
    img_size = overrides.pop("img_size", None) or args.get("input_size")
    if img_size is None and "pos_embed" in state:
        side = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
        img_size = side * patch
    img_size = img_size or 224
    pos = "abs" if method == "mae" else ("rpe" if rpe_key in state else "abs")
    config = ViTConfig(img_size=int(img_size), patch_size=patch, in_chans=in_chans, embed_dim=dim,
                       depth=depth, num_heads=int(heads), mlp_ratio=mlp_ratio, pos=pos)
    settings: dict = {"config": config}
    if method == "lomar":
        window = int(overrides.get("window_size", args.get("window_size", 7)))
        rows, cols = window_positions(grid_size(int(img_size), patch), window)
        # The original silently caps the window count at the grid (SPEC §6.2); do the same here.
        settings.update(window_size=window, num_windows=min(int(args.get("num_window", 4)), rows, cols),
                        mask_ratio=args.get("mask_ratio", 0.8), norm_pix_loss=args.get("norm_pix_loss", True))
    elif method == "mae":
        ddim = state["decoder_embed.weight"].shape[0]
        ddepth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
        dheads = overrides.pop("decoder_num_heads", None)
        if dheads is None and "dec512" in str(args.get("model", "")):
            dheads = 16  # every published MAE model: 512-wide decoder, 16 heads
        if dheads is None and ddim == 512:
            dheads = 16
        if dheads is None:
            raise ValueError(f"cannot infer the number of heads of the {ddim}-wide MAE decoder; "
                             f"pass decoder_num_heads=... to load_original")
        settings.update(decoder_embed_dim=ddim, decoder_depth=ddepth, decoder_num_heads=int(dheads),
                        mask_ratio=args.get("mask_ratio", 0.75), norm_pix_loss=args.get("norm_pix_loss", True))
    else:
        settings["num_classes"] = state["head.weight"].shape[0]
    config_overrides = {k: overrides.pop(k) for k in list(overrides) if k in ViTConfig.__dataclass_fields__}
    if config_overrides:
        settings["config"] = replace(config, **config_overrides)
    # Settings of another method (a window size for an MAE checkpoint, say) are hints from
    # callers that cannot know the method beforehand: ignored. Names no model takes are typos.
    accepted = {name: set(inspect.signature(cls.__init__).parameters) - {"self", "config"}
                for name, cls in (("lomar", LoMaR), ("mae", MAE), ("classifier", VisionTransformer))}
    unknown = sorted(set(overrides) - set().union(*accepted.values()))
    if unknown:
        known = set().union(*accepted.values(), ViTConfig.__dataclass_fields__)
        raise ValueError(f"unknown override(s) {', '.join(unknown)} for load_original; "
                         f"accepted: {', '.join(sorted(known))}")
    settings.update({k: v for k, v in overrides.items() if k in accepted[method]})
    return method, settings


def load_original(path: str | Path, **overrides) -> nn.Module:
    """Build our model from an original LoMaR / MAE (pretraining or finetuned) checkpoint.

    Returns a :class:`LoMaR`, :class:`MAE` or classifier :class:`VisionTransformer`, with
    weights loaded strictly (the unused LoMaR ``pos_embed`` is dropped, SPEC §6.3).
    """
    data = safe_load(path)
    method, settings = infer_original_config(data, **overrides)
    state = data.get("model", data)
    if method == "lomar":
        model: nn.Module = LoMaR(**settings)
        converted = lomar_from_original(state, keep_pos_embed=model.encoder.pos_embed is not None)
    elif method == "mae":
        model = MAE(**settings)
        converted = _mae_from_original(state)
    else:
        model = VisionTransformer(settings.pop("config"), **settings)
        converted = classifier_from_original(state, model)
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as exc:
        details = " ".join(line.strip() for line in str(exc).splitlines()[1:])
        raise ValueError(f"checkpoint {path} does not match the inferred {method} model: {details[:400]}; "
                         f"pass overrides to load_original") from exc
    return model


def classifier_from_original(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """An original finetuned model's keys -> our classifier's.

    The RPE tables are renamed; an unused ``pos_embed`` is dropped, and so is a final
    ``norm`` if present (the classifier pools un-normed tokens into ``fc_norm``).
    """
    out = {}
    for key, value in state.items():
        if (key == "pos_embed" and model.pos_embed is None) or key.startswith("norm."):
            continue
        match = _RPE_ORIGINAL.match(key)
        out[f"blocks.{match[1]}.attn.rpe.table" if match else key] = value
    return out
