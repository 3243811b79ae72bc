"""Export a BEiT encoder in timm's ``Beit`` layout: safetensors + config.json, written atomically.

The relative position bias is stored per block (the shared pretraining table copied into every
block, as the original finetuning initialises it), so the export loads into
``timm.models.beit.Beit(use_rel_pos_bias=True, use_abs_pos_emb=False, global_pool='token')``,
whose ``forward_features`` then equals our ``BEiT.forward_features`` (final LayerNorm included).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.models.beit import Beit

from lomar.checkpoints.export import CONFIG_NAME, timm_pretrained_cfg, write_export
from lomar.checkpoints.keys_beit import beit_to_timm
from lomar.models.beit import BEiT

__all__ = ["export_beit_encoder", "timm_beit_args", "create_timm_beit"]

TIMM_ARCHITECTURE = "beit_base_patch16_224"  # its model_args override every size


def timm_beit_args(beit: BEiT) -> dict:
    """Constructor arguments of the timm ``Beit`` the export loads into (no classifier)."""
    c = beit.config
    if c.attn_head_dim is not None or c.qk_scale is not None:
        raise ValueError("timm's Beit has no attn_head_dim / qk_scale; this BEiT cannot be exported to it")
    return dict(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim,
                depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias,
                init_values=c.init_values or None, use_abs_pos_emb=c.use_abs_pos_emb,
                use_rel_pos_bias=bool(c.use_rel_pos_bias or c.use_shared_rel_pos_bias),
                use_shared_rel_pos_bias=False, num_classes=0, global_pool="token")


def export_beit_encoder(beit: BEiT, out_dir: str | Path, weights_name: str = "encoder.safetensors",
                        metadata: dict | None = None) -> Path:
    """Write ``weights_name`` (timm ``Beit`` keys, no lm_head / mask_token) and ``config.json``."""
    out = Path(out_dir)
    state = beit_to_timm({k: v.detach().cpu() for k, v in beit.state_dict().items()}, per_block=True)
    state = {k: v.contiguous() for k, v in state.items()}
    args = timm_beit_args(beit)
    # A registered timm name whose constructor takes every argument in model_args, which spell out this
    # architecture: timm.create_model('local-dir:DIR', pretrained=True) rebuilds it with no lomar import.
    pretrained_cfg = timm_pretrained_cfg(beit.config.in_chans, beit.config.img_size, 0, crop_pct=0.9)
    config = {"architecture": TIMM_ARCHITECTURE, "num_classes": 0, "model_args": args, "pretrained_cfg": pretrained_cfg,
              "method": "beit", "weights": weights_name, "timm_args": args, "beit_config": beit.config.to_dict(),
              **(metadata or {})}
    return write_export(out, weights_name, state, config)


def create_timm_beit(path: str | Path) -> torch.nn.Module:
    """The timm ``Beit`` of an exported folder, weights loaded (strict)."""
    path = Path(path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; export a BEiT encoder first")
    data = json.loads(config_path.read_text())
    if data.get("method") != "beit":
        raise ValueError(f"{config_path} is not a BEiT export (method={data.get('method')!r})")
    model = Beit(**data["timm_args"])
    model.load_state_dict(load_file(str(path / data["weights"])), strict=True)
    return model.eval()
