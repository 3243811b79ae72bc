"""Helpers shared by the tests (import them: ``from helpers import ...``); fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lomar.cli.app import main

_DEFAULT_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def reference_dir() -> Path:
    """The golden-vector folder: ``LOMAR_REFERENCE_DIR``, else ``../shared/reference`` beside the repo."""
    return Path(os.environ.get("LOMAR_REFERENCE_DIR", _DEFAULT_REFERENCE))


# A 2-block, 32-wide ViT on 32 px crops: 4x4 patch grid, 3x3 windows, 2 per image.
TINY = ["--model", "vit_tiny_patch8", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--img-size", "32", "--window-size", "3", "--windows", "2", "--batch-size", "4", "--epochs", "2",
        "--workers", "0", "--threads", "1", "--log-every", "1", "--device", "cpu", "--lr", "1e-3",
        "--warmup-epochs", "0.5", "--precision", "fp32"]


def write_images(folder: Path, count: int, size: tuple[int, int] = (40, 48)) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = (np.random.RandomState(i).rand(*size, 3) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return folder


def pretrain(*args: str) -> int:
    return main(["pretrain", *TINY, *args])


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
