"""What a COCO file's values must be where pycocotools reads them: JSON numbers and integers, a segmentation's
polygons or RLE of its image's size (pycocotools decodes runs of another total into memory it never wrote); a
segmentation's pixel count, COCO's ``area``; and that the file and its image folder are there (torch-free, as is this
module: DetectConfig checks them before torch is imported)."""

from __future__ import annotations

import math
from pathlib import Path

from lomar.errors import UsageError
from lomar.values import listed

__all__ = ["json_number", "json_integer", "run_lengths", "segmentation_error", "mask_area", "check_coco_paths"]


def json_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def json_integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def run_lengths(counts: list | str) -> list[int] | None:
    """An RLE's run lengths: a list as given, a compressed string read as pycocotools reads it (6-bit
    characters from '0', 5 bits of value each, the last one's sign extended, each run after the second
    a difference from the one two before); None where malformed or a run is negative."""
    if isinstance(counts, list):
        return counts if all(json_integer(v) and v >= 0 for v in counts) else None
    runs, value, shift = [], 0, 0
    for char in counts:
        code = ord(char) - 48
        if not 0 <= code < 64:
            return None
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:  # more characters to this run
            continue
        if code & 0x10:
            value -= 1 << shift
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
        value, shift = 0, 0
    return runs if not shift and all(v >= 0 for v in runs) else None


def segmentation_error(seg, width: float, height: float) -> str | None:
    """Why ``seg`` is not a COCO segmentation of a ``width`` x ``height`` image; None when it is one."""
    if isinstance(seg, list):
        if not seg:
            return "an empty polygon list"
        for polygon in seg:
            if not (isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
                    and all(json_number(v) for v in polygon)):
                return f"polygon {str(polygon)[:40]}, which is not a list of at least 3 x, y pairs"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)) or \
                not isinstance(counts, (list, str)):
            return "an RLE without an integer size [height, width] and counts"
        if size != [int(height), int(width)]:
            return f"an RLE of size {size}, but its image is {int(height)}x{int(width)} (height x width)"
        # pycocotools decodes runs of another total into memory it never wrote, or past the mask's end
        runs = run_lengths(counts)
        if runs is None or sum(runs) != size[0] * size[1]:
            what = "malformed counts" if runs is None else f"counts totalling {sum(runs)} pixels"
            return f"an RLE with {what}, where its {size[0]}x{size[1]} mask needs runs totalling {size[0] * size[1]}"
        return None
    return f"a {type(seg).__name__}, neither polygons nor an RLE"


def mask_area(seg, width: float, height: float) -> float:
    """A checked segmentation's pixel count: COCO's ``area``, which pycocotools' APs/m/l read for boxes and masks
    alike (detectron2 writes the same when it converts a set to COCO)."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        return float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(seg, int(height), int(width)))))
    if isinstance(seg["counts"], list):
        seg = mask_utils.frPyObjects(seg, int(height), int(width))
    return float(mask_utils.area(seg))


def check_coco_paths(ann_file: str | Path, image_root: str | Path | None, flag: str, images_flag: str) -> None:
    """A UsageError when the instances file is not a file or its image folder (None: not checked) not a folder."""
    if Path(ann_file).is_dir():  # an image or annotations folder given for the file, or the file's folder
        found = sorted(p.name for p in Path(ann_file).glob("*.json"))
        held = f", e.g. one it holds: {listed(found, 3)}" if found else ""
        raise UsageError(f"{flag} {Path(ann_file)} is a folder; pass a COCO instances JSON file{held}")
    if not Path(ann_file).is_file():
        raise UsageError(f"{flag} {Path(ann_file)} does not exist; pass a COCO instances JSON file")
    if image_root is not None and not Path(image_root).is_dir():
        raise UsageError(f"{images_flag} {Path(image_root)} is not a folder; pass the folder holding "
                         f"{Path(ann_file).name}'s images")
