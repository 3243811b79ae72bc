"""Export a BEiT encoder in timm's ``Beit`` layout: safetensors + config.json, written atomically.

The relative position bias is stored per block (the shared pretraining table copied into every
block, as the original finetuning initialises it), so the export loads into
``timm.models.beit.Beit(use_rel_pos_bias=True, use_abs_pos_emb=False, global_pool='token')``,
whose ``forward_features`` then equals our ``BEiT.forward_features`` (final LayerNorm included).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from lomar.checkpoints.export import (
    _BOUNDS,
    check_bounds,
    check_fits,
    header_shapes,
    read_config_json,
    timm_pretrained_cfg,
    weights_path,
)
from lomar.checkpoints.export_write import write_export
from lomar.checkpoints.file_names import CONFIG_NAME, RUN_ENCODER
from lomar.checkpoints.keys_beit import beit_to_timm
from lomar.errors import UsageError
from lomar.limits import MAX_IMG_SIZE
from lomar.models.beit import BEiT, BEiTConfig, timm_beit_args
from lomar.values import is_real

__all__ = ["export_beit_encoder", "read_beit_export", "create_timm_beit"]

TIMM_ARCHITECTURE = "beit_base_patch16_224"  # its model_args override every size


def export_beit_encoder(beit: BEiT, out_dir: str | Path, weights_name: str = RUN_ENCODER,
                        metadata: dict | None = None) -> Path:
    """Write ``weights_name`` (timm ``Beit`` keys, no lm_head / mask_token) and ``config.json``."""
    out = Path(out_dir)
    state = beit_to_timm({k: v.detach().cpu() for k, v in beit.state_dict().items()}, per_block=True)
    state = {k: v.contiguous() for k, v in state.items()}
    args = timm_beit_args(beit)
    # A registered timm name whose constructor takes every argument in model_args, which spell out this
    # architecture: timm.create_model('local-dir:DIR', pretrained=True) rebuilds it with no lomar import.
    # classifier: timm drops the head it names and loads the rest non-strictly when num_classes=N asks for one,
    # as its own BEiT configs do (without it, a new head was a strict load's missing head.weight)
    pretrained_cfg = {**timm_pretrained_cfg(beit.config.in_chans, beit.config.img_size, 0), "classifier": "head"}
    config = {"architecture": TIMM_ARCHITECTURE, "num_classes": 0, "model_args": args, "pretrained_cfg": pretrained_cfg,
              "method": "beit", "weights": weights_name, "timm_args": args, "beit_config": beit.config.to_dict(),
              **(metadata or {})}
    return write_export(out, weights_name, state, config)


# beit_config's sizes: those of a ViT export, the image side and the tokenizer's vocabulary (the lm_head's rows)
_BEIT_BOUNDS = {**_BOUNDS, "img_size": (int, 1, MAX_IMG_SIZE), "vocab_size": (int, 2, 1_000_000)}


def read_beit_export(path: str | Path) -> tuple[BEiTConfig, dict, Path]:
    """Validate a BEiT export folder: (its BEiTConfig, timm ``Beit`` args, weights file). Builds no model.

    config.json is untrusted: ``beit_config`` is checked for types and bounds, ``timm_args`` must be what it
    implies (timm would otherwise build whatever they ask for, any size), and the weights' names and shapes
    (from the safetensors header) must be that model's. UsageError names what is wrong.
    """
    path = Path(path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; export a BEiT encoder with `lomar export` first")
    data = read_config_json(config_path)
    if data.get("method") != "beit":
        raise UsageError(f"{config_path} is not a BEiT export (method={data.get('method')!r}); load it with "
                         f"lomar.create_encoder")
    saved = data.get("beit_config")
    if not isinstance(saved, dict):
        raise UsageError(f"{config_path}: beit_config must be an object, got {saved!r}; re-export the BEiT encoder")
    check_bounds(config_path, saved, _BEIT_BOUNDS)
    flags = [k for k in ("qkv_bias", "use_shared_rel_pos_bias", "use_rel_pos_bias", "use_abs_pos_emb")
             if k in saved and not isinstance(saved[k], bool)]
    scale = saved.get("init_values")
    if flags or not (scale is None or is_real(scale) and 0 <= scale < 1e3):
        what = f"{flags[0]} must be true or false, got {saved[flags[0]]!r}" if flags else \
            f"init_values must be null or a number in [0, 1000), got {scale!r}"
        raise UsageError(f"{config_path}: beit_config: {what}; re-export the BEiT encoder")
    try:
        config = BEiTConfig.from_dict(saved)
        args = timm_beit_args(config)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{config_path}: beit_config: {exc}; re-export the BEiT encoder") from None
    given = data.get("timm_args")
    if not isinstance(given, dict) or given != args:
        differ = [f"{k}={given.get(k, '(missing)')!r} where beit_config gives {args.get(k, '(none)')!r}"
                  for k in sorted(set(args) | set(given)) if given.get(k) != args.get(k)] if isinstance(given, dict) \
            else [f"{given!r}, not an object"]
        raise UsageError(f"{config_path}: timm_args {'; '.join(differ[:3])}; re-export the BEiT encoder")
    weights = weights_path(path, data, default=RUN_ENCODER)
    with torch.device("meta"):  # shapes without storage
        wanted = {k: tuple(v.shape) for k, v in beit_to_timm(BEiT(config).state_dict(), per_block=True).items()}
    check_fits(weights, config_path, dict(sorted(wanted.items())), dict(sorted(header_shapes(weights).items())))
    return config, args, weights


def create_timm_beit(path: str | Path) -> torch.nn.Module:
    """The timm ``Beit`` of an exported folder, validated first (:func:`read_beit_export`), weights loaded (strict)."""
    from timm.models.beit import Beit  # timm imports torchvision and torch._dynamo: only to build one

    _, args, weights = read_beit_export(path)
    model = Beit(**args)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()
