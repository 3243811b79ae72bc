"""COCO instance sets for detection: the annotation file checked and cleaned, images as
torchvision's ``CocoDetection`` through its v2 wrapper (ViTDet's large-scale jitter: :mod:`lomar.data.jitter`).

A COCO instances file (``images``, ``annotations``, ``categories``) is read once and checked:
a malformed file (missing keys, duplicate ids, an annotation naming an unknown image or
category, images listed but absent from the image folder, an empty split) is a
:class:`~lomar.errors.UsageError` naming the file and the fix. For the model, boxes are clipped to their image
and a box of zero area after clipping is skipped, both counted (:class:`CocoSummary`), as are images naming a file
an earlier image names (LIVECell's published files list images labelled twice under two ids); the AP is scored against
the file's own boxes (:meth:`CocoSplit.coco`), as pycocotools' ``COCO(file)`` and detectron2 score them. Crowd
annotations are left out of training targets and kept for evaluation, as detectron2 does;
training also leaves out images without a box (detectron2's ``FILTER_EMPTY_ANNOTATIONS``).
Each segmentation is checked to be polygons (lists of at least 3 x, y pairs; one reaching far outside its image
is clipped, :mod:`lomar.data.polygons`) or an RLE of its image's size (:mod:`lomar.data.coco_values`); an ``area``
left out is the segmentation's pixel count (COCO's definition, which APs/m/l read; COCOeval fails without it), an
``iscrowd`` left out 0.

Images are read as every command reads them (:func:`lomar.data.decode.load_image`: bounded, EXIF
upright, 16-bit scaled by depth); one that cannot be read, or whose upright size is not the size the
file gives it, is skipped with a warning (its item is a :class:`Skipped` line, :func:`collate_detection` drops it).
A training sample's random jitter is a function of (seed, epoch, index), so a resumed run draws what
the uninterrupted one did whatever the worker count.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VisionDataset, wrap_dataset_for_transforms_v2

from lomar.data.coco_values import check_coco_paths, json_integer, json_number, mask_area, segmentation_error
from lomar.data.collate import LabelledBatch, Skipped, refilled, split_skipped
from lomar.data.decode import load_image, max_image_pixels, open_pil, read_image_bytes
from lomar.data.polygons import fit_polygons
from lomar.data.records import IntTable, PackedRecords, pack_images
from lomar.data.transforms import sample_generator, sample_key
from lomar.errors import UsageError
from lomar.values import brief

__all__ = ["CocoSplit", "CocoSummary", "read_coco", "training_split", "CocoInstances", "detection_dataset",
           "DetectionSamples", "collate_detection", "collate_detection_refill"]


_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")  # and a segmentation: _maskless says why
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)  # the stat errors Path.is_file takes as no file


@dataclass
class CocoSummary:
    """What cleaning did to one file: counts for the start-up line."""

    images: int = 0
    boxes: int = 0
    clipped: int = 0  # boxes reaching outside their image, clipped to it
    zero_area: int = 0  # boxes of no area (after clipping), skipped
    crowd: int = 0  # crowd regions: not training targets; evaluation ignores detections on them
    far: int = 0  # polygons reaching far outside their image, clipped (lomar.data.polygons)
    areas: int = 0  # annotations without an 'area', given their mask's pixel count
    boxless: int = 0  # a training split's images without a usable box, which training leaves out
    shared: int = 0  # images naming a file an earlier image names (c/y.jpg, ./c/y.jpg, a link to it)
    shared_first: str = ""  # the first such pair, for the line
    # the category ids with a box kept (non-crowd, of some area): those a training split trains, a val split scores;
    # None where not known (a summary not made by read_coco; a packed file carries them: lomar.data.coco_shared names
    # its file by a digest of this module, so one written without them is never read)
    boxed: list[int] | None = None

    def line(self, scored: bool = False) -> str:
        """The start-up line; ``scored``: a validation split's, whose boxes COCOeval scores as the file writes them."""
        words = (("crowd regions (detections on them not counted)", "boxes reaching outside their image (scored as "
                  "written)", "boxes of zero area (scored as written: no detected box matches one, lowering box AP)")
                 if scored else ("crowd regions (ignored in training)", "boxes clipped to their image",
                                 "boxes of zero area skipped"))
        notes = [*zip((self.crowd, self.clipped, self.zero_area), words), (self.far, "polygons reaching far outside "
                 "their image clipped"), (self.areas, "areas left out of the file taken from the masks"),
                 (self.boxless, "images without a box left out of training"),
                 (self.shared, f"images naming a file an earlier image names, e.g. {self.shared_first} (each trained "
                               f"and scored as a photo of only its own annotations)")]
        return ", ".join([f"{self.images} images, {self.boxes} boxes"] + [f"{n} {text}" for n, text in notes if n])


@dataclass
class CocoSplit:
    """A checked COCO file: ``data`` the cleaned dict (the model's targets), ``root`` the image folder,
    ``categories`` the category ids in order (label i + 1 is ``categories[i]``), ``scored`` the file's annotations
    as COCOeval scores them (:meth:`coco`; None for a training split, and another process's)."""

    path: Path
    root: Path
    data: dict
    categories: list[int]
    summary: CocoSummary = field(default_factory=CocoSummary)
    packed: tuple[PackedRecords, IntTable] | None = None  # (records, ids) packed by lomar.data.coco_shared
    scored: list[dict] | None = None

    @property
    def names(self) -> list[str]:
        """The categories' names, in ``categories``' order: what a checkpoint keeps beside the ids, so that a file
        whose ids name other classes (a re-export that numbered them anew) is not resumed as the same set."""
        by_id = {c["id"]: str(c["name"]) for c in self.data["categories"]}
        return [by_id[i] for i in self.categories]

    def coco(self):
        """The ground truth to score: a pycocotools ``COCO`` of the file's annotations as ``COCO(file)`` reads them
        (boxes unclipped, those of zero area kept; an ``area``, ``iscrowd`` left out filled, far polygons fitted),
        over copies of the entries (its evaluation sets their keys in place: a polygon's RLE, ``ignore``; it never
        changes the masks, which the copies share: a deep copy of a val2017-sized split took 6.4 s per evaluation,
        this 0.2); its index printout swallowed."""
        from pycocotools.coco import COCO

        if self.scored is None:
            raise ValueError(f"{self.path}: this split keeps only its training targets; score the one read_coco gave")
        coco, parts = COCO(), {**self.data, "annotations": self.scored}
        coco.dataset = {key: [dict(entry) for entry in parts[key]] for key in ("images", "annotations", "categories")}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco


def _fail(path: Path, message: str) -> UsageError:
    return UsageError(f"{path}: {message}")


def _maskless(path: Path, annotations: list[dict], i: int) -> UsageError:
    """A box-only annotation (CVAT's and Roboflow's detection exports write ``"segmentation": []``), with the count."""
    count = sum(a.get("segmentation") in (None, [], {}) for a in annotations)
    seg = annotations[i].get("segmentation")
    what = "no 'segmentation'" if seg is None else f"as segmentation an empty {'polygon list' if seg == [] else 'RLE'}"
    return _fail(path, f"annotations[{i}] (id {annotations[i]['id']!r}) has {what} ({count} of {len(annotations)} "
                       f"annotations have no mask): Mask R-CNN trains on each object's mask; add polygons or RLE "
                       f"masks, or give a box-only object its box [x, y, w, h] as the polygon "
                       f"[[x, y, x+w, y, x+w, y+h, x, y+h]]")


def _unique(path: Path, entries: list[dict], what: str) -> None:
    counts = Counter(e["id"] for e in entries)
    twice = [i for i, n in counts.items() if n > 1]
    if twice:
        raise _fail(path, f"{what} id {twice[0]!r} appears {counts[twice[0]]} times ({len(twice)} duplicated id(s)); "
                          f"give every {what} a unique id")


def _check_files(path: Path, root: Path, images: list[dict], images_flag: str, summary: CocoSummary) -> None:
    """Each image's file_name is a regular file under ``root``; images naming one file are counted in ``summary``.
    pycocotools and detectron2 take two ids of one file as two images: right for a photo labelled twice, each id
    with all its objects (LIVECell's published files hold such), wrong for a photo whose objects were split between
    ids (each trained with the others' as background). Only the user can tell which: said, not refused. One stat an
    image, none an annotation."""
    missing, first, shared = [], {}, []
    for i, image in enumerate(images):
        try:
            info = os.stat(root / str(image["file_name"]))
        except OSError as exc:
            if exc.errno not in _ABSENT:  # a folder denied, a name too long: said as what they are (cli.app)
                raise
            info = None
        except ValueError:  # a NUL in the name
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            missing.append(image["file_name"])
        elif (j := first.setdefault((info.st_dev, info.st_ino), i)) != i:  # c/y.jpg, ./c/y.jpg, a link to it
            shared.append((j, i))
    if missing:
        fix = (f"pass the folder holding them as {images_flag}, or fix the file_name entries" if len(missing) == len(
            images) else f"the other {len(images) - len(missing)} are there: add the missing files, or remove their "
                         f"images and annotations from the file (or pass a folder holding all as {images_flag})")
        raise _fail(path, f"lists {len(missing)} image(s) not found under {root}, e.g. {missing[0]}; {fix}")
    if shared:
        j, i = shared[0]
        summary.shared, summary.shared_first = len(shared), (
            f"images[{j}] (id {images[j]['id']!r}, {brief(images[j]['file_name'])}) and images[{i}] (id "
            f"{images[i]['id']!r}, {brief(images[i]['file_name'])})")


def _entries(path: Path, data: dict, key: str, required: tuple[str, ...]) -> list[dict]:
    entries = data[key]
    if not isinstance(entries, list):
        raise _fail(path, f"'{key}' must be a list, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        missing = [k for k in required if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise _fail(path, f"{key}[{i}] has no '{missing[0]}'; each of {key} needs {', '.join(required)}")
    return entries


def _clip_box(box, width: float, height: float) -> tuple[list[float], bool] | None:
    """COCO [x, y, w, h] clipped to the image -> (box, clipped); None for a box of zero area."""
    x, y, w, h = box
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    # corners, not widths: x + w - x is not w in floats (10.1 + 20.2 - 10.1), which counted every such box clipped;
    # a box inside is kept as the file gives it, so that it is scored as pycocotools scores the file
    if (x1, y1, x2, y2) == (x, y, x + w, y + h):
        return [x, y, w, h], False
    return [x1, y1, x2 - x1, y2 - y1], True


def read_coco(ann_file: str | Path, image_root: str | Path, flag: str = "--train-ann",
              images_flag: str = "--train-images") -> CocoSplit:
    """Read and check a COCO instances file and its image folder (see the module docstring)."""
    path, root = Path(ann_file), Path(image_root)
    check_coco_paths(path, root, flag, images_flag)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: Windows tools write a byte order mark
    except RecursionError:  # json reads nesting by recursion
        raise _fail(path, "nests arrays or objects too deep to read; pass a COCO instances file") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, or an integer of more digits than Python reads
        raise _fail(path, f"not valid JSON ({str(exc).split('; use ')[0]}); pass a COCO instances file") from None
    if not isinstance(data, dict):
        raise _fail(path, "must hold a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise _fail(path, f"no '{key}' key; a COCO instances file has images, annotations and categories")
    images = _entries(path, data, "images", _IMAGE_KEYS)
    annotations = _entries(path, data, "annotations", _ANNOTATION_KEYS)
    categories = _entries(path, data, "categories", ("id", "name"))
    for what, entries in (("image", images), ("annotation", annotations), ("category", categories)):
        if bad := [e["id"] for e in entries if not json_integer(e["id"])]:
            raise _fail(path, f"{what} id {brief(bad[0])} is not an integer; COCO ids (and pycocotools) are integers")
        _unique(path, entries, what)
    for i, ann in enumerate(annotations):  # before they are looked up: a list would not even hash
        for key in ("image_id", "category_id"):
            if not json_integer(ann[key]):
                raise _fail(path, f"annotations[{i}] (id {ann['id']!r}) has {key} {brief(ann[key])}, not an integer id")
    if not images:
        raise _fail(path, "lists no images; an empty split cannot be trained or evaluated")
    if not categories:
        raise _fail(path, "lists no categories; add the classes under 'categories'")
    sizes, limit = {}, max_image_pixels()
    for i, image in enumerate(images):
        w, h = image["width"], image["height"]
        if not all(json_number(v) and v > 0 for v in (w, h)):
            raise _fail(path, f"images[{i}] (id {image['id']!r}) has width {brief(w)}, height {brief(h)}; both must be "
                              f"positive numbers (pixels, not text)")
        if w * h > limit:  # never decoded (load_image refuses it); pycocotools would rasterise polygons at its size
            raise _fail(path, f"images[{i}] (id {image['id']!r}) is {w:.0f}x{h:.0f} pixels, over the {limit:,} an "
                              f"image is decoded at (LOMAR_MAX_IMAGE_PIXELS); leave it out, or raise the limit")
        sizes[image["id"]] = (float(w), float(h))
    summary = CocoSummary(images=len(images))
    _check_files(path, root, images, images_flag, summary)
    known = {c["id"] for c in categories}
    kept, scored, boxed = [], [], set()
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}] (id {ann['id']!r})"
        if ann["image_id"] not in sizes:
            raise _fail(path, f"{where} refers to image_id {ann['image_id']!r}, which is not in images; "
                              f"fix or remove the annotation")
        if ann["category_id"] not in known:
            raise _fail(path, f"{where} refers to category_id {ann['category_id']!r}, which is not in categories; "
                              f"add the category or fix the annotation")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(json_number(v) for v in box)):
            raise _fail(path, f"{where} has bbox {brief(box)}; a bbox is [x, y, width, height], four finite numbers")
        if ann.get("segmentation") in (None, [], {}):
            raise _maskless(path, annotations, i)
        if why := segmentation_error(ann["segmentation"], *sizes[ann["image_id"]]):
            raise _fail(path, f"{where} has as segmentation {why}; fix or remove the annotation")
        crowd, area = ann.get("iscrowd", 0), ann.get("area")  # checked for every box: COCOeval scores each one
        if crowd not in (0, 1) or not isinstance(crowd, int):
            raise _fail(path, f"{where} has iscrowd {brief(crowd)}; it is 0 or 1 (a crowd region), or left out")
        if area is not None and not (json_number(area) and area >= 0):
            raise _fail(path, f"{where} has area {brief(area)}; an area is a finite number >= 0, or left out")
        seg = ann["segmentation"]
        if isinstance(seg, list):  # before pycocotools rasterises it (for the area here, and at every load)
            seg, far = fit_polygons(seg, *sizes[ann["image_id"]])
            summary.far += far
        summary.areas += area is None
        entry = {**ann, "iscrowd": int(crowd), "segmentation": seg,
                 "area": mask_area(seg, *sizes[ann["image_id"]]) if area is None else float(area)}
        fitted = _clip_box([float(v) for v in box], *sizes[ann["image_id"]])
        if fitted is None:
            summary.zero_area += 1
            scored.append(entry)
            continue
        summary.crowd += crowd
        summary.boxes += not crowd
        if not crowd:
            boxed.add(ann["category_id"])
        summary.clipped += fitted[1]
        kept.append({**entry, "bbox": fitted[0]})
        scored.append(entry if fitted[1] else kept[-1])  # equal boxes: one dict for both
    clean = {"images": images, "annotations": kept, "categories": categories}
    summary.boxed = sorted(boxed)
    return CocoSplit(path, root, clean, sorted(known), summary, scored=scored)


def training_split(split: CocoSplit) -> CocoSplit:
    """The split as training sees it: no crowd regions, no image without a box; a UsageError if none is left."""
    boxes = [a for a in split.data["annotations"] if not a["iscrowd"]]
    with_boxes = {a["image_id"] for a in boxes}
    images = [i for i in split.data["images"] if i["id"] in with_boxes]
    if not images:
        raise _fail(split.path, "has no image with a usable box (non-crowd, inside its image); training needs some")
    data = {**split.data, "images": images, "annotations": boxes}
    boxless = len(split.data["images"]) - len(images)  # said, so that the run's image count matches the file's
    return CocoSplit(split.path, split.root, data, split.categories, replace(split.summary, boxless=boxless))


def size_mismatch(path: Path, upright: tuple[int, int], stored: tuple[int, int], source: Path, width: float,
                  height: float) -> str:
    """Why an image (``upright`` and ``stored`` (height, width)) does not fit the ``width`` x ``height`` its
    annotation file ``source`` gives it; a tool that ignores EXIF annotates the stored frame, which then fits."""
    turned = stored == (round(height), round(width)) != upright
    return (f"{path} is {upright[1]}x{upright[0]} upright, but {source} gives it {width}x{height}: its annotations "
            f"would not fit" + (" (the file is stored at that size, turned by its EXIF orientation: annotate the "
                                "upright photo, or remove the orientation tag if the annotations are of the stored "
                                "frame)" if turned else ""))


class _Skipped(Exception):
    """An image that cannot be used: unreadable, or not the size its annotations are for."""


class CocoInstances(CocoDetection):
    """``CocoDetection`` over a checked :class:`CocoSplit` (not re-read from disk), category ids
    mapped to contiguous labels 1..K (0 is torchvision's background), images read by
    :func:`lomar.data.decode.load_image`. Each image's file, size and annotations are one pickled record
    (:class:`~lomar.data.records.PackedRecords`), not pycocotools' index of Python objects, which every loader
    worker would come to copy; the targets are those ``CocoDetection`` gives (its annotations in file order)."""

    def __init__(self, split: CocoSplit, transforms=None):
        VisionDataset.__init__(self, str(split.root), transforms=transforms)
        self.records, self.ids = split.packed or pack_images(split.data, split.categories)  # ids: the v2 wrapper's
        self.source = split.path

    def _read_image(self, file_name, width, height) -> tv_tensors.Image:
        path = Path(self.root) / file_name
        try:
            image = load_image(path)
        except ValueError as exc:
            raise _Skipped(str(exc)) from None
        if tuple(image.shape[-2:]) != (round(height), round(width)):
            with open_pil(read_image_bytes(path), str(path)) as opened:  # its stored size, for the message
                stored = opened.size[::-1]
            raise _Skipped(size_mismatch(path, tuple(image.shape[-2:]), stored, self.source, width, height))
        return tv_tensors.Image(image)

    def __getitem__(self, index: int) -> tuple:
        file_name, width, height, target = self.records[index]
        image = self._read_image(file_name, width, height)
        return (image, target) if self.transforms is None else self.transforms(image, target)


class DetectionSamples(Dataset):
    """``dataset``'s (image, target) by key (an index, or the sampler's (index, epoch)), or a :class:`Skipped`
    line for an image that cannot be used (a warning says why, once per image and process). With ``seed``, the sample's
    random transforms draw from a stream that is a function of (seed, epoch, index) alone; the caller's
    stream is left as it was."""

    def __init__(self, dataset, seed: int | None = None):
        self.dataset, self.seed, self.skipped = dataset, seed, set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = sample_key(key)
        try:
            if self.seed is None:
                return self.dataset[index]
            with torch.random.fork_rng(devices=()):
                torch.manual_seed(sample_generator(self.seed, epoch, index).initial_seed())
                return self.dataset[index]
        except _Skipped as exc:
            return Skipped.warned(exc, index, self.skipped)


def detection_dataset(split: CocoSplit, transforms, train: bool, seed: int | None = None) -> DetectionSamples:
    """(image (3, H, W) float, target) pairs, or :class:`Skipped` (:class:`DetectionSamples`; ``seed``: of the random
    transforms); target: boxes (N, 4) xyxy, labels (N,), masks (N, H, W) and image_id for training,
    image_id only for evaluation."""
    keys = {"image_id", "boxes", "labels", "masks"} if train else {"image_id"}
    return DetectionSamples(wrap_dataset_for_transforms_v2(CocoInstances(split, transforms), target_keys=keys), seed)


def collate_detection(batch: list, refill: bool = False) -> LabelledBatch:
    """(images, targets) as lists (images differ in size, targets in box count), ``bad`` the skipped samples'
    lines; those are dropped, or with ``refill`` replaced by the batch's others in turn (a training batch
    keeps its size)."""
    good, bad = split_skipped(batch)
    if refill and good:
        good = refilled(good, len(batch))
    return LabelledBatch([image for image, _ in good], [target for _, target in good], bad)


collate_detection_refill = partial(collate_detection, refill=True)  # a partial pickles for loader workers
