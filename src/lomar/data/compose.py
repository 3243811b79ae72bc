"""A real, offline detection / segmentation set: scikit-learn's handwritten digits pasted onto
scikit-image's bundled photographs, written in COCO and ADE20K layouts.

:func:`compose_digits` writes, under ``out`` (built in a temporary sibling folder, then renamed into place)::

    annotations/instances_train.json  annotations/instances_val.json   COCO instances
    images/train/*.jpg                images/val/*.jpg                 (categories 1..10 named "0".."9")
    images/training/*.jpg             images/validation/*.jpg          ADE20K layout, the same pictures
    annotations/training/*.png        annotations/validation/*.png     0 = background, digit d -> d + 1
    classify/{train,val}/{0..9}/*.jpg                                  one digit per image (classify_images > 0)
    compose.json                                                       the parameters and counts

Each digit (8x8, values 0..16) is resized smoothly (bicubic) to a random side in
``digit_scale`` x ``img_size``, placed at a random spot not overlapping the other digits' boxes,
and blended in a colour that contrasts with the photo beneath; its pixel mask is where the
resized intensity reaches half of the full ink (8/16), so masks, boxes and label maps agree.
COCO segmentations are uncompressed RLE (``{"counts": [...], "size": [h, w]}``, column-major, as
pycocotools reads it), boxes ``[x, y, w, h]`` tight around the mask, ``area`` the mask's pixel count.
The digit samples are split before composing: a sample appears in train or in val, never both.
Everything is drawn from one ``numpy`` generator seeded by ``seed``: the same arguments give the
same files.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from lomar.checkpoints.file_lock import holding_file_lock
from lomar.checkpoints.io import write_error
from lomar.checkpoints.own_names import made_beside, own_folder, remove_made_beside
from lomar.data.demo_images import demo_image_paths
from lomar.errors import UsageError
from lomar.limits import MAX_IMG_SIZE

__all__ = ["MIN_DIGIT", "compose_digits", "rle_encode", "COCO_SPLITS", "ADE_SPLITS"]

MIN_DIGIT = 8  # px: sklearn's digits are 8x8

COCO_SPLITS = {"train": "train", "val": "val"}
ADE_SPLITS = {"train": "training", "val": "validation"}
_INK = 8.0  # half of the digits' full intensity (16): the mask threshold


def rle_encode(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of a (H, W) boolean mask: run lengths in column-major order, zeros first."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _photos() -> list[np.ndarray]:
    """The bundled photographs as (H, W, 3) uint8."""
    out = []
    for path in demo_image_paths():
        with Image.open(path) as image:
            out.append(np.asarray(image.convert("RGB")))
    return out


def _background(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    """A random square crop (half to all of the short side) of a random photo, resized to ``size``."""
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    return np.asarray(crop.resize((size, size), Image.BICUBIC)).astype(np.float32)


def _ink(digit: np.ndarray, side: int) -> np.ndarray:
    """(side, side) intensity in 0..16 of an 8x8 digit, bicubic-resized."""
    return np.clip(np.asarray(Image.fromarray(digit.astype(np.float32)).resize((side, side), Image.BICUBIC)),
                   0, 16)


def _paste(canvas: np.ndarray, ink: np.ndarray, top: int, left: int, rng: np.random.Generator) -> np.ndarray:
    """Blend ``ink`` into ``canvas`` (in place) in a colour far from the pixels beneath; the (side, side) mask."""
    side = ink.shape[0]
    under = canvas[top:top + side, left:left + side]
    colour = rng.uniform(0, 255, 3)
    if np.abs(colour - under.mean((0, 1))).sum() < 200:  # too close to the photo: take the complement
        colour = 255 - under.mean((0, 1))
        colour = np.where(np.abs(colour - under.mean((0, 1))) < 60, np.where(colour > 127, 255.0, 0.0), colour)
    # a steep ramp around the threshold: the painted stroke and the mask share their edge
    alpha = np.clip((ink - _INK) / 6 + 0.5, 0, 1)[..., None]
    under[...] = alpha * colour + (1 - alpha) * under
    return ink >= _INK


def _encode(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    """A float picture as a JPEG (quality 95), or a uint8 label map as a PNG."""
    buffer = io.BytesIO()
    options = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(buffer, fmt, **options)
    return buffer.getvalue()


def _compose_one(rng, photos, pool, cursor, size, per_image, digit_scale):
    """One picture: (image (S, S, 3) float, labels (S, S) uint8, [(digit, mask)]), next pool cursor."""
    digits, targets = pool
    canvas = _background(rng, photos, size)
    labels = np.zeros((size, size), np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    instances = []
    for _ in range(int(rng.integers(per_image[0], per_image[1] + 1))):
        side = int(rng.integers(int(digit_scale[0] * size), int(digit_scale[1] * size) + 1))
        side = max(MIN_DIGIT, min(side, size))
        for _try in range(20):  # a free spot, else fewer digits on this picture
            top, left = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            if all(top + side <= t or t + s <= top or left + side <= lft or lft + s <= left
                   for t, lft, s, _ in boxes):
                break
        else:
            continue
        index = cursor % len(digits)
        cursor += 1
        mask = np.zeros((size, size), bool)
        mask[top:top + side, left:left + side] = _paste(canvas, _ink(digits[index], side), top, left, rng)
        labels[mask] = targets[index] + 1
        boxes.append((top, left, side, index))
        instances.append((int(targets[index]), mask))
    return canvas, labels, instances, cursor


def _coco_annotations(instances, image_id: int, next_id: int) -> list[dict]:
    out = []
    for digit, mask in instances:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        x, y = int(cols[0]), int(rows[0])
        out.append({"id": next_id + len(out), "image_id": image_id, "category_id": digit + 1,
                    "bbox": [x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1], "area": int(mask.sum()),
                    "segmentation": rle_encode(mask), "iscrowd": 0})
    return out


def _check(img_size, images, val_fraction, per_image, digit_scale, classify_images, classify_size) -> None:
    if img_size < 32:
        raise ValueError(f"img_size must be >= 32 pixels, got {img_size}")
    if images < 2:
        raise ValueError(f"images must be >= 2 (at least one per split), got {images}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 1 <= per_image[0] <= per_image[1]:
        raise ValueError(f"per_image must be LOW HIGH with 1 <= LOW <= HIGH, got {per_image}")
    if not 0 < digit_scale[0] <= digit_scale[1] <= 1:
        raise ValueError(f"digit_scale must be LOW HIGH with 0 < LOW <= HIGH <= 1, got {digit_scale}")
    if classify_images < 0 or (classify_images and not 32 <= classify_size <= MAX_IMG_SIZE):
        raise ValueError(f"classify_images must be >= 0 and classify_size in 32..{MAX_IMG_SIZE}, got "
                         f"{classify_images}, {classify_size}")
    if img_size > MAX_IMG_SIZE:  # a float picture of 90000 px a side is 97 GB: the system kills the process
        raise ValueError(f"img_size must be <= {MAX_IMG_SIZE} pixels, got {img_size}")


def compose_digits(out: str | Path, img_size: int = 256, images: int = 200, seed: int = 0,
                   val_fraction: float = 0.25, per_image: tuple[int, int] = (2, 5),
                   digit_scale: tuple[float, float] = (0.12, 0.4), classify_images: int = 0,
                   classify_size: int = 224, overwrite: bool = False) -> dict:
    """Write the composed set (see the module docstring) to ``out``; returns what compose.json holds.

    ``images``: pictures in both splits together, ``val_fraction`` of them (and of the digit
    samples) for validation; ``per_image``: digits per picture (fewer when no free spot is found);
    ``classify_images``: one-digit pictures of ``classify_size`` px for the classification variant,
    split alike (0: none). Raises ValueError on bad arguments and FileExistsError when ``out``
    holds files and not ``overwrite``, or files of another origin (no compose.json); UsageError while another
    compose-digits writes ``out``. Holding ``out``'s lock (``.NAME.lock`` beside it), it removes the hidden folders
    killed writes left there, but keeps and names those holding a whole set; without flock it only names them.
    """
    per_image, digit_scale = tuple(per_image), tuple(digit_scale)  # as the CLI's lists, so messages read alike
    _check(img_size, images, val_fraction, per_image, digit_scale, classify_images, classify_size)
    out = Path(out)
    if out.is_symlink():  # the set goes where the link points: the swap's renames would replace the link itself
        out = out.resolve()
    with _write_lock(out) as locked:
        if locked:
            _clear_leftovers(out)
        else:
            _tell_leftovers(out)
        return _compose(out, img_size, images, seed, val_fraction, per_image, digit_scale, classify_images,
                        classify_size, overwrite)


def _compose(out: Path, img_size, images, seed, val_fraction, per_image, digit_scale, classify_images,
             classify_size, overwrite) -> dict:
    """:func:`compose_digits` past its checks, with ``out``'s lock held where it can be."""
    from sklearn.datasets import load_digits  # as compose_digits': only a write needs it

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} already exists and is not empty; pass overwrite=True (--overwrite) "
                                  f"or choose another folder")
        if not (out / "compose.json").is_file():  # replacing is deleting: only a set this wrote
            raise FileExistsError(f"{out} holds files compose-digits did not write (no compose.json); overwrite "
                                  f"replaces only a set it wrote: choose another folder")
    rng = np.random.default_rng(seed)
    bunch = load_digits()
    order = rng.permutation(len(bunch.target))
    # each split at least one picture and one digit sample, however close to 0 or 1 the fraction rounds
    n_val_digits = min(len(order) - 1, max(1, int(round(len(order) * val_fraction))))
    pools = {"val": order[:n_val_digits], "train": order[n_val_digits:]}
    n_val = min(images - 1, max(1, int(round(images * val_fraction))))
    counts = {"train": images - n_val, "val": n_val}
    photos = _photos()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = own_folder(out)  # the umask's permissions, which the rename gives the set
    summary = {"seed": seed, "img_size": img_size, "val_fraction": val_fraction, "per_image": list(per_image),
               "digit_scale": list(digit_scale), "classify_size": classify_size, "splits": {}}
    try:
        for split in ("train", "val"):
            pool = (bunch.images[pools[split]], bunch.target[pools[split]])
            summary["splits"][split] = _write_split(work, split, rng, photos, pool, counts[split], img_size,
                                                    per_image, digit_scale)
            if classify_images:
                n = classify_images - int(round(classify_images * val_fraction)) if split == "train" \
                    else int(round(classify_images * val_fraction))
                summary["splits"][split]["classify_images"] = _write_classify(
                    work, split, rng, photos, pool, max(1, n), classify_size)
        (work / "compose.json").write_text(json.dumps(summary, indent=1) + "\n")
        _swap_in(work, out)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        # a failed write's OSError names no file (a full disk), or one in the folder just removed: name ``out``
        if isinstance(exc, OSError) and (exc.filename is None or work in Path(exc.filename).parents):
            raise (write_error(exc, out) or exc) from exc
        raise
    return summary


def _write_lock(out: Path) -> contextlib.AbstractContextManager[bool]:
    """Hold ``.NAME.lock`` beside ``out`` while writing it (the flock of a study's data build): yields whether it is
    held; not where the filesystem has no flock or the lock file cannot be made. Another compose-digits holding it:
    UsageError at once (its set would replace this one's, or this one's its)."""

    def refusal(owner: str) -> UsageError:
        return UsageError(f"{out} is being written by another compose-digits ({owner}); run again once it ends, or "
                          f"choose another folder")

    return holding_file_lock(out.with_name(f".{out.name}.lock"), 0.0, refusal, unopened_ok=True)


def _clear_leftovers(out: Path) -> None:
    """With ``out``'s lock held (no writer of it lives): remove the hidden folders killed writes left beside it, but
    keep those holding a whole set (compose.json, written last) and name them. A write killed between
    :func:`_swap_in`'s two renames leaves two whole sets, the replaced one and its successor, under names alike: which
    one belongs at ``out`` is the user's call, not this one's."""
    if whole := remove_made_beside(out, keep=lambda folder: (folder / "compose.json").is_file()):
        logging.getLogger("lomar.data").warning(
            "%s: %d hidden folder(s) beside it holding a whole set from a compose-digits killed before it renamed "
            "it in or removed it (%s): one killed while --overwrite replaced the set holds that set; keep what you "
            "need (rename it to %s) and delete the rest", out, len(whole), _names(whole), out.name)


def _names(folders: list[Path]) -> str:
    return ", ".join(path.name for path in folders[:3]) + (", ..." if len(folders) > 3 else "")


def _tell_leftovers(out: Path) -> None:
    """Without ``out``'s lock: warn of the hidden folders beside ``out`` that a compose-digits writing it left
    (killed, or still running): one killed between :func:`_swap_in`'s two renames holds the set ``--overwrite`` was
    replacing, which is nowhere else. Named, not removed: a live writer's own folder looks the same."""
    if leftovers := [path for path in made_beside(out) if path.is_dir()]:
        logging.getLogger("lomar.data").warning(
            "%s: %d hidden folder(s) beside it from a compose-digits that did not finish (%s): one killed while "
            "--overwrite replaced the set holds that set, whole; keep what you need and delete them once no other "
            "compose-digits writes there", out, len(leftovers), _names(leftovers))


def _swap_in(work: Path, out: Path) -> None:
    """Rename ``work`` to ``out``; a set at ``out`` is renamed aside first and removed only once the new one has the
    name: a crash between the two renames leaves the old set whole under its hidden name, and a failed rename of the
    new one gives the old one its name back. (Removing it first, a crash there would lose both.)"""
    if not out.exists():
        os.replace(work, out)
        return
    aside = own_folder(out)  # an empty folder of this writer's own, which the rename of ``out`` replaces
    try:
        os.replace(out, aside)
    except BaseException:
        aside.rmdir()
        raise
    try:
        os.replace(work, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside)


def _write_split(root: Path, split: str, rng, photos, pool, count: int, size: int, per_image, digit_scale) -> dict:
    coco_dir, ade_dir = root / "images" / COCO_SPLITS[split], root / "images" / ADE_SPLITS[split]
    label_dir = root / "annotations" / ADE_SPLITS[split]
    for folder in (coco_dir, ade_dir, label_dir):
        folder.mkdir(parents=True)
    coco = {"info": {"description": "sklearn digits on scikit-image photographs (lomar compose-digits)"},
            "images": [], "annotations": [],
            "categories": [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]}
    cursor = 0
    for i in range(count):
        image, labels, instances, cursor = _compose_one(rng, photos, pool, cursor, size, per_image, digit_scale)
        stem = f"{split}_{i:05d}"
        data = _encode(image)
        (coco_dir / f"{stem}.jpg").write_bytes(data)
        (ade_dir / f"{stem}.jpg").write_bytes(data)
        (label_dir / f"{stem}.png").write_bytes(_encode(labels, "PNG"))
        coco["images"].append({"id": i + 1, "file_name": f"{stem}.jpg", "height": size, "width": size})
        coco["annotations"] += _coco_annotations(instances, i + 1, len(coco["annotations"]) + 1)
    (root / "annotations" / f"instances_{COCO_SPLITS[split]}.json").write_text(json.dumps(coco))
    return {"images": count, "instances": len(coco["annotations"]), "digit_samples": int(len(pool[1]))}


def _write_classify(root: Path, split: str, rng, photos, pool, count: int, size: int) -> int:
    digits, targets = pool
    for d in range(10):
        (root / "classify" / split / str(d)).mkdir(parents=True)
    for i in range(count):  # one large digit on a photo crop
        index, canvas = i % len(targets), _background(rng, photos, size)
        side = int(rng.integers(int(0.45 * size), int(0.8 * size) + 1))
        top, left = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        _paste(canvas, _ink(digits[index], side), top, left, rng)
        (root / "classify" / split / str(int(targets[index])) / f"{split}_{i:05d}.jpg").write_bytes(_encode(canvas))
    return count
