"""Original BEiT pretraining checkpoints → :class:`~lomar.models.beit.BEiT`, and BEiT → timm keys.

Our parameter names are the original's (and timm's), so the mappings only drop or rebuild the
``relative_position_index`` buffers, move the shared table into blocks where asked, and check shapes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from lomar.checkpoints.io import safe_load
from lomar.models.abs_pos import square_side
from lomar.models.beit import BEiT, BEiTConfig
from lomar.models.vit_config import mlp_ratio_of

__all__ = ["beit_from_original", "load_original_beit", "beit_to_timm", "per_block_from_shared", "holds_beit_keys"]
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def holds_beit_keys(state: dict) -> bool:
    """Whether a state dict is BEiT's (layer scale, q/v biases, relative position tables, lm_head): its other key
    names are the ViT's, so read as a ViT it would only miss or mismatch weights."""
    return any(k.startswith("lm_head.") or k.endswith(("relative_position_bias_table", ".gamma_1", ".attn.q_bias"))
               for k in state)


def _rel_grid(n_rel: int, key: str) -> tuple[int, int]:
    side = math.isqrt(n_rel - 3)
    if side * side != n_rel - 3 or side % 2 == 0:
        raise ValueError(f"{key} has {n_rel} rows, not (2G-1)^2+3 for a square grid G; "
                         f"only square grids can be inferred, pass img_size")
    return (side + 1) // 2, (side + 1) // 2


def beit_from_original(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Original BEiT pretraining keys → (config fields inferred from shapes, our state dict).

    The names are the same; the ``relative_position_index`` buffers are dropped (rebuilt).
    ``init_values`` is only known to be on or off (the trained γ are in the state dict).
    """
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    required = ["patch_embed.proj.weight", "cls_token", "mask_token", "norm.weight", "lm_head.weight",
                "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not an original BEiT pretraining state dict: missing {missing}; expected the "
                         f"'model' entry of a modeling_pretrain checkpoint")
    ours = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m[1]) for k in state if (m := _BLOCK.match(k)))  # blocks.0.* keys are among the required
    shared_key, block_key = "rel_pos_bias.relative_position_bias_table", "blocks.0.attn.relative_position_bias_table"
    info: dict = dict(embed_dim=dim, in_chans=in_chans, patch_size=patch, depth=depth,
                      mlp_ratio=mlp_ratio_of(dim, state["blocks.0.mlp.fc1.weight"].shape[0]),
                      qkv_bias="blocks.0.attn.q_bias" in state,
                      init_values=(0.1 if "blocks.0.gamma_1" in state else None),
                      use_shared_rel_pos_bias=shared_key in state, use_rel_pos_bias=block_key in state,
                      use_abs_pos_emb="pos_embed" in state, vocab_size=state["lm_head.weight"].shape[0])
    table_key = shared_key if shared_key in state else block_key if block_key in state else None
    if table_key is not None:
        n_rel, info["num_heads"] = state[table_key].shape
        info["img_size"] = _rel_grid(n_rel, table_key)[0] * patch
    elif "pos_embed" in state:
        side = square_side(state["pos_embed"])
        if side is None:  # a BEiT's grid is square: the root's floor would build one the table does not fit
            raise ValueError(f"pos_embed holds {state['pos_embed'].shape[1] - 1} patches, not a square grid; a BEiT "
                             f"takes square images only, so this is no BEiT pretraining state dict")
        info["img_size"] = side * patch
    return info, ours


def load_original_beit(path: str | Path, **overrides) -> BEiT:
    """Build a :class:`BEiT` from an original pretraining checkpoint (``{'model': sd}`` or bare sd).

    Read with ``weights_only=True``; keyword arguments override the inferred config (``num_heads``
    is needed when the checkpoint has no relative position table).
    """
    info, state = beit_from_original(safe_load(path))
    info.update(overrides)
    if "num_heads" not in info:
        raise ValueError(f"{path}: cannot infer num_heads (no relative position table); pass num_heads=")
    if "img_size" not in info:
        raise ValueError(f"{path}: cannot infer the grid (no position table or embedding); pass img_size=")
    inner = state["blocks.0.attn.qkv.weight"].shape[0] // 3
    if inner != info["embed_dim"] and info.get("attn_head_dim") is None:
        info["attn_head_dim"] = inner // info["num_heads"]  # heads narrower or wider than embed_dim/heads
    if info.get("init_values") is None and state.get("blocks.0.gamma_1") is not None:
        info["init_values"] = 0.1
    model = BEiT(BEiTConfig.from_dict(info))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit BEiT({info}): missing {missing[:6]}, unexpected {unexpected[:6]}, "
                         f"wrong shape {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:4]]}; "
                         f"check the overrides")
    model.load_state_dict(state)
    return model


def per_block_from_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy the shared table into every block and drop it (what the original finetuning does). A block
    that has a table of its own too adds both biases: it gets their sum, the same bias."""
    key = "rel_pos_bias.relative_position_bias_table"
    if key not in state:
        raise ValueError(f"state dict has no {key}; it already has per-block tables or none")
    depth = 1 + max(int(m[1]) for k in state if (m := _BLOCK.match(k)))
    out = {k: v for k, v in state.items() if not k.startswith("rel_pos_bias.")}
    for i in range(depth):
        own = state.get(f"blocks.{i}.attn.relative_position_bias_table")
        out[f"blocks.{i}.attn.relative_position_bias_table"] = state[key].clone() if own is None else state[key] + own
    return out


def beit_to_timm(state: dict[str, torch.Tensor], per_block: bool = False) -> dict[str, torch.Tensor]:
    """Our keys → ``timm.models.beit.Beit`` keys (timm uses the original names), without a classifier.

    ``per_block`` copies a shared table into every block (for ``Beit(use_rel_pos_bias=True)``);
    otherwise it stays at ``rel_pos_bias.*`` (``Beit(use_shared_rel_pos_bias=True)``). The
    pretraining-only ``mask_token`` and ``lm_head`` are dropped.
    """
    out = {k: v for k, v in state.items()
           if not (k.endswith("relative_position_index") or k == "mask_token" or k.startswith("lm_head."))}
    if per_block and "rel_pos_bias.relative_position_bias_table" in out:
        out = per_block_from_shared(out)
    return out
