"""Weights-only export of an encoder: safetensors + config.json, and loading it back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lomar.models.vit import MODEL_SIZES, PATCH_SIZES, ViTConfig, VisionTransformer

__all__ = ["export_encoder", "create_encoder", "timm_architecture", "ENCODER_WEIGHTS", "CONFIG_NAME"]

ENCODER_WEIGHTS = "model.safetensors"
CONFIG_NAME = "config.json"


def timm_architecture(config: ViTConfig, num_classes: int = 0) -> tuple[str, dict, dict]:
    """timm name (``lomar_vit_{size}_patch{p}``), constructor args and pretrained_cfg of an encoder.

    The args always spell out the architecture, so non-standard widths rebuild exactly. Written
    into ``config.json`` so that ``timm.create_model('local-dir:DIR', pretrained=True)`` works
    (after ``import lomar.models.timm``).
    """
    from lomar.data.images import IMAGENET_MEAN, IMAGENET_STD  # data imports torchvision: only when exporting

    shape = (config.embed_dim, config.depth, config.num_heads)
    size = next((s for s, v in MODEL_SIZES.items() if v == shape), None)
    size = size or min(MODEL_SIZES, key=lambda s: abs(MODEL_SIZES[s][0] - config.embed_dim))
    patch = config.patch_size if config.patch_size in PATCH_SIZES else 16
    args = {k: config.to_dict()[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth",
                                              "num_heads", "mlp_ratio", "pos")}
    side = config.img_size
    pretrained_cfg = {"input_size": [config.in_chans, side, side], "interpolation": "bicubic", "crop_pct": 0.875,
                      "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "num_classes": num_classes,
                      "first_conv": "patch_embed.proj", "fixed_input_size": False, "license": "apache-2.0"}
    return f"lomar_vit_{size}_patch{patch}", args, pretrained_cfg


def export_encoder(encoder: VisionTransformer, out_dir: str | Path, weights_name: str = ENCODER_WEIGHTS,
                   metadata: dict | None = None) -> Path:
    """Write ``weights_name`` (safetensors) and ``config.json`` for the encoder into ``out_dir``.

    Both are written to temporary names and renamed, so a crash never leaves half a file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    name, model_args, pretrained_cfg = timm_architecture(encoder.config, encoder.num_classes)
    config = {"architecture": name, "weights": weights_name, **encoder.config.to_dict(),
              "num_classes": encoder.num_classes, "model_args": model_args, "pretrained_cfg": pretrained_cfg,
              **(metadata or {})}
    tmp_weights, tmp_config = out / f".{weights_name}.tmp", out / f".{CONFIG_NAME}.tmp"
    save_file(state, str(tmp_weights))
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_weights, out / weights_name)
    os.replace(tmp_config, out / CONFIG_NAME)
    return out


def create_encoder(path: str | Path, **overrides) -> VisionTransformer:
    """Rebuild an exported encoder from its directory (config.json + safetensors weights)."""
    path = Path(path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; export an encoder with `lomar export` first")
    data = json.loads(config_path.read_text())
    weights = path / data.get("weights", ENCODER_WEIGHTS)
    num_classes = overrides.pop("num_classes", data.get("num_classes", 0))
    config = ViTConfig.from_dict({**data, **overrides})
    encoder = VisionTransformer(config, num_classes=num_classes)
    state = load_file(str(weights))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if unexpected or (missing and num_classes == data.get("num_classes", 0)):
        raise ValueError(f"{weights} does not match its config: missing {missing}, unexpected {unexpected}")
    return encoder
