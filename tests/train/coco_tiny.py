"""A tiny COCO instances set written on the fly: coloured rectangles and discs on noise, with
polygon masks, two categories with non-contiguous ids (3 and 7)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}]


def _polygon(kind: str, x: float, y: float, w: float, h: float) -> list[float]:
    if kind == "square":
        return [x, y, x + w, y, x + w, y + h, x, y + h]
    cx, cy = x + w / 2, y + h / 2
    angles = [a * math.pi / 8 for a in range(16)]
    return [v for a in angles for v in (cx + w / 2 * math.cos(a), cy + h / 2 * math.sin(a))]


def write_tiny_coco(root: Path, images: int = 8, seed: int = 0, size=(96, 128)) -> tuple[Path, Path]:
    """root/images/*.png + root/instances.json; -> (annotation file, image folder)."""
    rng = np.random.default_rng(seed)
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    height, width = size
    data = {"images": [], "annotations": [], "categories": CATEGORIES}
    for i in range(images):
        pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:height, :width]
        for _ in range(int(rng.integers(1, 4))):
            kind = ("square", "disc")[int(rng.integers(2))]
            w, h = (float(v) for v in rng.integers(20, 40, 2))
            x, y = float(rng.integers(0, width - w)), float(rng.integers(0, height - h))
            if kind == "square":
                inside = (xx >= x) & (xx < x + w) & (yy >= y) & (yy < y + h)
                colour = (230, 40, 40)
            else:
                inside = ((xx + 0.5 - x - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - y - h / 2) / (h / 2)) ** 2 <= 1
                colour = (40, 230, 40)
            pixels[inside] = colour
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "image_id": i + 1, "category_id": 3 if kind == "square" else 7,
                "bbox": [x, y, w, h], "area": float(inside.sum()), "iscrowd": 0,
                "segmentation": [_polygon(kind, x, y, w, h)]})
        name = f"img{i:03d}.png"
        Image.fromarray(pixels).save(folder / name)
        data["images"].append({"id": i + 1, "file_name": name, "width": width, "height": height})
    ann = root / "instances.json"
    ann.write_text(json.dumps(data))
    return ann, folder


def edited_coco(ann: Path, folder: Path, change) -> str:
    """``ann`` as ``change`` (called on its parsed JSON, in place) leaves it, written to ``folder/bad.json``; a
    ``change`` that makes the data a string writes that text as it is."""
    data = json.loads(ann.read_text())
    change(data)
    path = folder / "bad.json"
    path.write_text(json.dumps(data) if isinstance(data, dict) else data)
    return str(path)
