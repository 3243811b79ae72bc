"""Key-name maps between the original LoMaR / MAE checkpoints and ours, and shape inference.

Written once here and used by every reader in :mod:`lomar.checkpoints.formats` and by the timm
checkpoint filter.
"""

from __future__ import annotations

import argparse
import math
import re

import torch

from lomar.limits import MAX_IMG_SIZE
from lomar.models.abs_pos import square_side
from lomar.models.vit import MODEL_SIZES, VisionTransformer, ViTConfig
from lomar.models.vit_config import mlp_ratio_of
from lomar.values import as_sides, command_line, is_size

__all__ = ["ENCODER_PREFIXES", "CLASSIFIER_PREFIXES", "PRETRAIN_ONLY", "rename_rpe", "drop_final_norm",
           "lomar_from_original", "lomar_to_original", "mae_from_original", "classifier_from_original",
           "vit_from_original", "encoder_keys", "position_encoding", "args_dict", "infer_vit_config",
           "no_embed_class_note"]

_RPE_ORIGINAL = re.compile(r"^blocks\.(\d+)\.attn\.rpe_k\.lookup_table_weight$")
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "blocks.", "norm.", "pos_embed")
CLASSIFIER_PREFIXES = ("head.", "fc_norm.")
PRETRAIN_ONLY = ("mask_token", "encoder_pred.", "decoder_")
# LoMaR's renames each way, (pattern, replacement), the first match wins; other keys keep their names.
_FROM_ORIGINAL = [(_RPE_ORIGINAL, r"encoder.blocks.\1.attn.rpe.table"), (re.compile(r"^encoder_pred\."), "head."),
                  (re.compile("^(" + "|".join(map(re.escape, ENCODER_PREFIXES)) + ")"), r"encoder.\1")]
_TO_ORIGINAL = [(re.compile(r"^encoder\.blocks\.(\d+)\.attn\.rpe\.table$"),
                 r"blocks.\1.attn.rpe_k.lookup_table_weight"),
                (re.compile(r"^head\."), "encoder_pred."), (re.compile(r"^encoder\."), "")]


def rename_rpe(key: str) -> str:
    """The original iRPE table name -> ours (``blocks.i.attn.rpe.table``); other keys unchanged."""
    match = _RPE_ORIGINAL.match(key)
    return f"blocks.{match[1]}.attn.rpe.table" if match else key


def drop_final_norm(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A classifier pools un-normed tokens into ``fc_norm``: its final ``norm.*`` goes unused.

    Returns (state without ``norm.*``, the dropped keys)."""
    dropped = [k for k in state if k.startswith("norm.")]
    return {k: v for k, v in state.items() if not k.startswith("norm.")}, dropped


def _rename(key: str, table: list) -> str:
    for pattern, replacement in table:
        new, found = pattern.subn(replacement, key)
        if found:
            return new
    return key


def lomar_from_original(state: dict[str, torch.Tensor], keep_pos_embed: bool = False) -> dict[str, torch.Tensor]:
    """Original LoMaR keys -> ours. The unused ``pos_embed`` is dropped unless asked for."""
    return {_rename(k, _FROM_ORIGINAL): v for k, v in state.items() if keep_pos_embed or k != "pos_embed"}


def lomar_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our LoMaR keys -> the original's (inverse of :func:`lomar_from_original`)."""
    return {_rename(k, _TO_ORIGINAL): v for k, v in state.items()}


def mae_from_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original MAE keys -> ours: the encoder's parts move under ``encoder.``."""
    return {("encoder." + k if k.startswith(ENCODER_PREFIXES) else k): v for k, v in state.items()}


def classifier_from_original(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """An original finetuned model's keys -> our classifier's (RPE renamed, unused parts dropped: the final ``norm.*``
    where ``model`` pools patch tokens into ``fc_norm``; a cls-token classifier's head reads that norm)."""
    if model.global_pool == "avg":
        state, _ = drop_final_norm(state)
    return vit_from_original(state, model)


def vit_from_original(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """An original ViT's keys -> ``model``'s: RPE renamed, ``pos_embed`` dropped where ``model`` has no table (an RPE
    encoder's unused one)."""
    return {rename_rpe(k): v for k, v in state.items() if not (k == "pos_embed" and model.pos_embed is None)}


def encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any state dict we read (ours, pretraining, original) -> VisionTransformer key names.

    Pretraining-only parts (mask token, pixel head, decoder) are dropped; nothing is checked."""
    if any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return {rename_rpe(k): v for k, v in state.items() if not k.startswith(PRETRAIN_ONLY)}


def position_encoding(state: dict[str, torch.Tensor]) -> str:
    """The ``pos`` an encoder's weights (our key names) were trained with; an RPE table wins over the unused
    absolute table an original LoMaR checkpoint keeps."""
    return "rpe" if "blocks.0.attn.rpe.table" in state else "abs" if "pos_embed" in state else "none"


# ---- shape inference --------------------------------------------------------------------------
def args_dict(data: dict, keys: tuple[str, ...] = ("args",)) -> dict:
    """The run's saved arguments: the entries ``keys`` (argparse.Namespace or dict) merged in order."""
    merged: dict = {}
    for v in map(data.get, keys):
        merged.update(vars(v) if isinstance(v, argparse.Namespace) else v if isinstance(v, dict) else {})
    return merged


def _no_class_token(state: dict[str, torch.Tensor]) -> bool:
    """Whether a position table is stored and no ``cls_token``: a ViT without a class token (timm's
    ``class_token=False``), of a square grid or not: its table, read as a cls entry and patches, is not its grid."""
    return "cls_token" not in state and "pos_embed" in state


def no_embed_class_note(state: dict[str, torch.Tensor], size_flag: str) -> str:
    """The other reading of a position table (1, N, D) beside a stored ``cls_token`` that, read with a class entry,
    is of no square grid: where N is a square, " (its N entries are also a SxS grid without a class entry, timm's
    no_embed_class=True, which ``size_flag``PIXELS reads)", else "". ``size_flag``: how the caller's user gives a
    size (``"--img-size "``, ``"img_size="``)."""
    table = state.get("pos_embed")
    if "cls_token" not in state or table is None or table.ndim != 3:
        return ""
    side = math.isqrt(table.shape[1])
    if not side or side * side != table.shape[1]:
        return ""
    pixels = side * state["patch_embed.proj.weight"].shape[-1]
    return (f" (its {side * side} entries are also a {side}x{side} grid without a class entry, timm's "
            f"no_embed_class=True, which {size_flag}{pixels} reads)")


def infer_vit_config(state: dict[str, torch.Tensor], hints: dict | None = None, where: object = None,
                     **overrides) -> ViTConfig:
    """Rebuild an encoder's :class:`ViTConfig` from the shapes of its weights (our key names).

    ``overrides`` win; then the shapes (width, depth, patch, MLP ratio, heads from the RPE
    table (1, head_dim, 50)); then ``hints`` (``num_heads``, ``img_size``/``input_size``,
    ``model`` name); then the standard sizes. Raises ValueError when the heads stay unknown, its conversion command
    naming ``where`` (the checkpoint's path) when given.
    """
    hints = hints or {}
    if "patch_embed.proj.weight" not in state or "blocks.0.mlp.fc1.weight" not in state:
        raise ValueError("the weights hold no ViT encoder (no 'patch_embed.proj.weight' or 'blocks.0.mlp.fc1.weight')")
    if _no_class_token(state):  # before its heads are asked for: told them, it would still not load
        raise ValueError(f"{where or 'the checkpoint'} holds a position table but no cls_token: a ViT without a class "
                         f"token (timm's class_token=False), which lomar's ViT (a class token always) does not read; "
                         f"pass one that has a class token")
    weight = state["patch_embed.proj.weight"]
    dim, in_chans, patch = weight.shape[0], weight.shape[1], weight.shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    rpe_key = "blocks.0.attn.rpe.table"
    heads = overrides.get("num_heads") or (dim // state[rpe_key].shape[1] if rpe_key in state else None)
    name = hints.get("model") if isinstance(hints.get("model"), str) else ""
    by_name = next((h for size, (_, _, h) in MODEL_SIZES.items() if f"vit_{size}_" in name), None)
    heads = heads or hints.get("num_heads") or by_name
    heads = heads or {(d, n): h for d, n, h in MODEL_SIZES.values()}.get((dim, depth))
    if not heads:
        convert = command_line("lomar", "load-original", where or "CKPT", "--num-heads", "N", "--to", "FILE")
        raise ValueError(f"cannot infer the number of heads of this {dim}-wide, {depth}-deep model; pass "
                         f"num_heads=... to load_original, or convert it first: {convert}")
    img_size = overrides.get("img_size") or hints.get("img_size") or hints.get("input_size")
    if not img_size and "pos_embed" in state:
        side = square_side(state["pos_embed"])
        if side is None:
            also = no_embed_class_note(state, "img_size=")
            raise ValueError(f"the position table holds {state['pos_embed'].shape[1] - 1} patches, not a square grid, "
                             f"and the checkpoint saves no image size; pass img_size=(height, width) for the size it "
                             f"was trained at{also}")
        img_size = side * patch
    # none saved: 224; one that is no size (a string, a float): ViTConfig's message names it
    sides = as_sides(img_size) if img_size and is_size(img_size) else ()
    if not all(1 <= v <= MAX_IMG_SIZE for v in sides):  # an absolute table is built for it: bound it first
        raise ValueError(f"image size {img_size} (from the checkpoint's saved settings) is outside "
                         f"[1, {MAX_IMG_SIZE}]; pass img_size=... for the size to load it at")
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    return ViTConfig(img_size=img_size or 224, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth,
                     num_heads=int(heads), mlp_ratio=mlp_ratio_of(dim, hidden), pos=position_encoding(state))
