"""timm ViT layouts that lomar's encoder holds under other weights, and those it does not hold.

lomar's :class:`~lomar.models.vit.VisionTransformer` is timm's ViT with ``class_token=True``, ``qkv_bias=True``, no
layer scale, no register tokens and a position entry for the class token. Three of timm's other layouts are the same
function under other weights, which :func:`lomar_layout` writes exactly:

- layer scale (``init_values``: ``blocks.i.ls1.gamma`` / ``ls2.gamma``, DeiT III, DINOv2) scales the output of the
  linear before it, so it is folded into that linear (``attn.proj``, ``mlp.fc2``): ``γ⊙(Wx + b) = (γ⊙W)x + γ⊙b``;
- a bias-less linear (``qkv_bias=False``; ``proj_bias=False``: attn.proj, mlp.fc1, mlp.fc2) is one with zero biases;
- a table without the class token's entry (``no_embed_class=True``, DeiT III) adds nothing to the class token: a zero
  entry is put first. Where no size is saved or given and the weights are not otherwise timm's, such a table of a
  square grid is one shape with lomar's of a class entry and a non-square grid: the size is asked for
  (:func:`lomar.checkpoints.keys.infer_vit_config` names both readings).

Register tokens (``reg_tokens``: ``reg_token``, DINOv2-reg, ``vit_*_reg4_*``) are more tokens every block attends to,
which lomar's [cls] + patch tokens cannot hold: such weights are refused, naming them; so are a norm before the blocks
(``pre_norm``, CLIP), a norm of the queries and keys (``qk_norm``) and attention pooling (``global_pool='map'``).
"""

from __future__ import annotations

import logging
import math
import re

import torch

from lomar.checkpoints.keys import PRETRAIN_ONLY, args_dict
from lomar.checkpoints.keys_beit import holds_beit_keys
from lomar.models.masking import grid_size
from lomar.values import as_sides, command_line, is_size

log = logging.getLogger("lomar.checkpoints")

__all__ = ["saved_size", "timm_layouts", "lomar_layout"]

_GAMMA = re.compile(r"^blocks\.(\d+)\.ls([12])\.gamma$")
_SCALED = {"1": "attn.proj", "2": "mlp.fc2"}  # the linear whose output each layer scale scales
# A block's linears, each biased in lomar's ViT, and the timm setting that drops each one's bias
_LINEARS = {"attn.qkv": "qkv_bias=False", "attn.proj": "proj_bias=False", "mlp.fc1": "proj_bias=False",
            "mlp.fc2": "proj_bias=False"}
# Layouts of timm's ViT with weights no linear of lomar's holds (a norm or a pooling it has not): a key of each, and
# how timm names it, for a refusal that names the layout rather than its keys as unexpected.
_UNHELD = {re.compile(r"^norm_pre\."): "pre_norm=True (norm_pre: a norm before the blocks, as CLIP's)",
           re.compile(r"^blocks\.\d+\.attn\.[qk]_norm\."):
               "qk_norm=True (attn.q_norm / k_norm: a norm of the queries and keys)",
           re.compile(r"^attn_pool\."): "global_pool='map' (attn_pool: attention pooling, as SigLIP's)"}


def saved_size(data: dict) -> object:
    """The image size a checkpoint saved (its run's ``img_size`` / ``input_size``), None where it saved none."""
    hints = args_dict(data, ("config", "vit_config", "args"))
    return next((hints[k] for k in ("img_size", "input_size") if is_size(hints.get(k))), None)


def _biasless(state: dict[str, torch.Tensor]) -> list[str]:
    """timm's settings that leave a block's linears without biases (``qkv_bias=False``, ``proj_bias=False``)."""
    return sorted({name for linear, name in _LINEARS.items()
                   if f"blocks.0.{linear}.weight" in state and f"blocks.0.{linear}.bias" not in state})


def _not_lomars(state: dict[str, torch.Tensor]) -> bool:
    """Whether the weights hold what no lomar or original LoMaR / MAE model does (layer scale, a bias-less linear): a
    timm model's."""
    return any(_GAMMA.match(k) for k in state) or bool(_biasless(state))


def _no_embed_class(state: dict[str, torch.Tensor], size: object) -> bool:
    """Whether the position table (1, N, D) holds no class token's entry (timm's ``no_embed_class=True``): its N
    entries are the grid of ``size`` (the size saved or given); none known, a square grid's in weights no lomar model
    has (:func:`_not_lomars`, DeiT III's layer scale). A table of a class entry and a non-square grid (1 + H·W, as
    lomar's) is no shape apart from a square grid without one (25 = 1 + 4x6 = 5x5): there a size tells them apart."""
    table, patch = state.get("pos_embed"), state["patch_embed.proj.weight"].shape[-1]
    if "cls_token" not in state or table is None or table.ndim != 3 or not table.shape[1]:
        return False
    if size is None:
        return math.isqrt(table.shape[1]) ** 2 == table.shape[1] and _not_lomars(state)
    sides = as_sides(size)
    if any(side % patch for side in sides):
        return False
    rows, cols = grid_size(sides, patch)
    return rows * cols == table.shape[1]


def timm_layouts(state: dict[str, torch.Tensor], size: object = None) -> list[str]:
    """The timm layouts of a ViT's weights (timm's key names) that lomar's keys lack, as timm names their settings:
    ``reg_tokens``, those lomar's ViT does not hold (``pre_norm``, ``qk_norm``, ``global_pool='map'``), ``init_values``
    (layer scale), ``proj_bias=False``, ``qkv_bias=False``, ``no_embed_class=True``; ``size``: the image
    size saved or given (see :func:`_no_embed_class`). None of a pretraining model's or a BEiT's weights."""
    if ("patch_embed.proj.weight" not in state or holds_beit_keys(state)
            or any(k.startswith(PRETRAIN_ONLY) for k in state)):
        return []
    found = ["reg_tokens"] if "reg_token" in state else []
    found += [name for key, name in _UNHELD.items() if any(key.match(k) for k in state)]
    found += ["init_values"] if any(_GAMMA.match(k) for k in state) else []
    found += _biasless(state)
    return found + (["no_embed_class=True"] if _no_embed_class(state, size) else [])


def lomar_layout(state: dict[str, torch.Tensor], where: object, size: object = None,
                 given: bool = False) -> dict[str, torch.Tensor]:
    """A timm ViT's weights (timm's key names) under lomar's layout, the same function (module docstring): layer scale
    folded, zero biases for bias-less linears, a zero class entry put first in a ``no_embed_class`` table (1, N, D) ->
    (1, 1+N, D).
    ``size``: the image size saved or given (``given``: a caller's, not the file's). ValueError naming ``where`` for
    register tokens and the layouts lomar's ViT does not hold."""
    layouts = timm_layouts(state, size)
    if "reg_tokens" in layouts:
        count = state["reg_token"].shape[1] if state["reg_token"].ndim == 3 else "its"
        raise ValueError(f"{where} holds {count} register tokens (reg_token: timm's reg_tokens={count}, as DINOv2 "
                         f"with registers and vit_*_reg4_* have), which lomar's ViT (a class token and the patch "
                         f"tokens) does not hold; pass a ViT without register tokens")
    if unheld := [name for name in _UNHELD.values() if name in layouts]:
        raise ValueError(f"{where} is a timm ViT of {', '.join(unheld)}, which lomar's ViT does not hold; pass a ViT "
                         f"without it")
    if not layouts:
        return state
    out = {k: v for k, v in state.items() if not _GAMMA.match(k)}
    for key in [k for k in state if k.endswith(tuple(f".{linear}.weight" for linear in _LINEARS))]:
        out.setdefault(key.removesuffix("weight") + "bias", state[key].new_zeros(state[key].shape[0]))
    for key, gamma in state.items():
        if match := _GAMMA.match(key):
            linear = f"blocks.{match[1]}.{_SCALED[match[2]]}"
            out[f"{linear}.weight"] = state[f"{linear}.weight"] * gamma[:, None]
            out[f"{linear}.bias"] = out[f"{linear}.bias"] * gamma
    if "no_embed_class=True" in layouts:
        table = state["pos_embed"]
        out["pos_embed"] = torch.cat([table.new_zeros(1, 1, table.shape[2]), table], dim=1)
        if size is None:  # read by shape alone: say how the other reading is asked for
            side = math.isqrt(table.shape[1])
            export = command_line("lomar", "export", where, "--img-size", "HEIGHT", "WIDTH", "--to", "DIR")
            log.warning("%s: its position table of %d entries and its cls_token are read as timm's "
                        "no_embed_class=True (a %dx%d grid, no position for the class token); one of a class entry "
                        "and a %d-patch grid is read at the size it was trained at: %s, and read DIR",
                        where, table.shape[1], side, side, table.shape[1] - 1, export)
        elif given and not _not_lomars(state):  # a caller's size alone reads keys lomar's models have: say the other
            rows, cols = grid_size(as_sides(size), state["patch_embed.proj.weight"].shape[-1])
            log.warning("%s: its position table of %d entries is read at the img_size given as timm's "
                        "no_embed_class=True (a %dx%d grid, no position for the class token); lomar's own layout "
                        "of a class entry and a %d-patch grid is read at the size it was trained at",
                        where, table.shape[1], rows, cols, table.shape[1] - 1)
    return out
