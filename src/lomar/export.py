"""Weights-only export of an encoder: safetensors + config.json, and loading it back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .vit import ViTConfig, VisionTransformer

__all__ = ["export_encoder", "create_encoder", "ENCODER_WEIGHTS", "CONFIG_NAME"]

ENCODER_WEIGHTS = "model.safetensors"
CONFIG_NAME = "config.json"


def export_encoder(encoder: VisionTransformer, out_dir: str | Path, weights_name: str = ENCODER_WEIGHTS,
                   metadata: dict | None = None) -> Path:
    """Write ``weights_name`` (safetensors) and ``config.json`` for the encoder into ``out_dir``.

    Both are written to temporary names and renamed, so a crash never leaves half a file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    config = {"architecture": "lomar_vit", "weights": weights_name, **encoder.config.to_dict(),
              "num_classes": encoder.num_classes, **(metadata or {})}
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
