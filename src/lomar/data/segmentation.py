"""Semantic segmentation data in ADE20K's layout, checked up front, and mmseg's ADE20K pipeline.

``ROOT/images/<split>/<stem>.jpg`` pairs with ``ROOT/annotations/<split>/<stem>.png`` (split
``training`` or ``validation``); the PNG holds 0 for "ignored" and 1..N for the classes
(ADE's ``reduce_zero_label``): items carry 0..N-1, and :data:`IGNORE` where the file says 0 or
255 (mmseg's rule, which maps 255 back to ignored). With ``reduce_zero_label=False`` (VOC-style
data, binary masks) the file's 0..N-1 are the classes themselves and only 255 is ignored.
Every pair is checked when the dataset is built (a missing partner, two images of one stem, an annotation
of another size than its image, a class id above the N classes, an empty split): each ends in one
ValueError naming the file and the fix, before any training step; what the check found of a pair is kept in the
user's cache folder, so a later start decodes only the pairs whose files changed (:mod:`lomar.data.pair_checks`).
Only the headers of the images are read then: an image that fails to decode later is skipped with a warning
(its item is a :class:`Skipped` line; :func:`collate_segmentation` fills its place in a training batch and
reports it, evaluation leaves it out).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from lomar.data.collate import LabelledBatch, Skipped, refilled, split_skipped
from lomar.data.decode import JPEG_FORMATS, load_image, open_pil, oriented_size, read_image_bytes
from lomar.data.image_names import is_image_name, passed_over_folder
from lomar.data.pair_checks import BadSplit, pair_results
from lomar.data.pathtable import PathTable
from lomar.data.png_cut import png_cut_short
from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD, sample_generator, sample_key
from lomar.errors import exception_line
from lomar.values import counted, listed

__all__ = ["IGNORE", "MAX_CLASS_ID", "MEAN", "STD", "CLASS_LIST", "SegmentationFolder", "read_labels", "eval_scale",
           "eval_input", "collate_segmentation", "class_names"]

log = logging.getLogger("lomar.data")
IGNORE = 255  # in items and in annotation files (as 0 is in files)
MAX_CLASS_ID = 254  # the highest class id a file can hold: predictions are written as 8-bit PNGs
# ImageNet's statistics on 0..255 pixels, as mmseg writes them (123.675, ...; the same float32 values)
MEAN = torch.tensor([255 * m for m in IMAGENET_MEAN]).view(3, 1, 1)
STD = torch.tensor([255 * s for s in IMAGENET_STD]).view(3, 1, 1)
CLASS_LIST = "objectInfo150.txt"  # ADEChallengeData2016's: a header, then "Idx\tRatio\tTrain\tVal\tName" a class


def class_names(root: str | Path, num_classes: int) -> list[str] | None:
    """The classes' names (the first of each one's synonyms: mmseg's ADE20K names but id 90's, 'television' for
    mmseg's 'television receiver'), from ``root``'s :data:`CLASS_LIST`: ids 1..N, ADE's annotation ids; None without
    that file, or where it lists other ids."""
    try:
        lines = (Path(root) / CLASS_LIST).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    rows = [line.split("\t") for line in lines]
    named = {int(row[0]): row[-1].split(",")[0].strip() for row in rows if len(row) > 1 and row[0].strip().isdecimal()}
    return [named[i] for i in range(1, num_classes + 1)] if sorted(named) == list(range(1, num_classes + 1)) else None


def read_labels(path: Path) -> np.ndarray:
    """(H, W) uint8 class ids of an annotation PNG; ValueError naming it when it is not one (or not a
    regular file within the size limits every image read has)."""
    try:
        data = read_image_bytes(path)
        image = open_pil(data, str(path))
    except (ValueError, OSError) as exc:
        raise ValueError(f"annotation {path} cannot be read ({exception_line(exc)}); rewrite it as a PNG of "
                         f"class ids") from None
    with image:
        if image.format in (*JPEG_FORMATS, "WEBP"):  # named .png, but lossy: ids can blur into others at edges
            raise ValueError(f"annotation {path} is a {image.format} file, whose lossy compression can change class "
                             f"ids along edges; write class ids as a PNG")
        if image.mode not in ("L", "P", "I;16", "I"):
            raise ValueError(f"annotation {path} is {_what_mode(image)}; write class ids as a single-channel "
                             f"(mode L or P) PNG of class ids")
        try:
            labels = np.asarray(image)
        except Exception as exc:  # cut short after its header (OSError), a broken chunk (SyntaxError), ...
            why = exception_line(exc)
            raise ValueError(f"annotation {path} cannot be read ({why}); rewrite it as a PNG of class ids") from None
        if image.format == "PNG" and png_cut_short(image, data):  # its last rows would read as class 0
            raise ValueError(f"annotation {path} cannot be read (its pixel data ends before the last rows its header "
                             f"declares); rewrite it as a PNG of class ids")
        return labels


def _what_mode(image) -> str:
    """An annotation of a mode other than class ids, as its refusal names it: a colour mask's colours (each to be
    mapped to its id), or a grey one saved in colour (any one channel holds the ids)."""
    article = "an" if image.mode[0] in "AEFHILMNORSX" else "a"  # said letter by letter: "an RGB", "a CMYK"
    if image.mode not in ("RGB", "RGBA"):
        return f"{article} {image.mode} image"
    try:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    except Exception:  # cut short or broken: the mode alone says what it is
        return f"{article} {image.mode} image"
    if (pixels == pixels[:, :1]).all():
        return (f"{article} {image.mode} image whose channels are equal: a grey mask saved in colour, its ids in any "
                f"one channel (Pillow: .convert('L') keeps them)")
    colours = np.unique(pixels, axis=0)
    shown = ", ".join(str(tuple(int(v) for v in c)) for c in colours[:4]) + (", ..." if len(colours) > 4 else "")
    return (f"{article} {image.mode} colour mask of {counted(len(colours), 'colour')} ({shown}): map each colour to "
            f"its class id")


def _check_pair(image: Path, annotation: Path) -> tuple[int, int]:
    """(the highest class id, the ids held: bit i set for id i), the ignored 255 left out, of a pair whose files read
    and agree in size."""
    labels = read_labels(annotation)
    try:  # the size load_image gives: EXIF orientation applied, as labels drawn on the photo are
        with open_pil(read_image_bytes(image), str(image)) as opened:
            height, width = oriented_size(opened)
            stored = opened.size[::-1]
    except (ValueError, OSError) as exc:
        raise ValueError(f"image {image} cannot be read ({exception_line(exc)}); replace or remove it with "
                         f"its annotation") from None
    if labels.shape != (height, width):
        # a labelling tool that ignores EXIF draws on the stored frame: the file's own size then matches, so say why
        turned = (f" (the photo is stored {stored[1]}x{stored[0]}, shown {width}x{height} as its EXIF orientation "
                  f"says: draw the labels on the upright photo)" if labels.shape == stored != (height, width) else "")
        raise ValueError(f"annotation {annotation} is {labels.shape[1]}x{labels.shape[0]} but its image {image.name} "
                         f"is {width}x{height}; write the annotation at the image's size{turned}")
    if labels.min(initial=0) < 0:  # a 32-bit image (a TIFF under a .png name): the loader's bincount fails on it
        raise ValueError(f"annotation {annotation} holds class id {int(labels.min())}; class ids are not negative; "
                         f"write them as a PNG of ids 0..{MAX_CLASS_ID} ({IGNORE} ignored)")
    if (top := int(labels.max(initial=0))) > max(MAX_CLASS_ID, IGNORE):  # refused by its id: no count up to it
        return top, 0
    # Pillow's histogram, in C: 0.5-0.7 ms an ADE-sized mask where numpy's bincount took 1.5-2.0 (decoding it: 6-9)
    counts = Image.fromarray(labels.astype(np.uint8, copy=False)).histogram()
    held = [i for i, count in enumerate(counts) if count and i != IGNORE]
    return max(held, default=0), sum(1 << i for i in held)


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether a listed entry is a folder; a symlink loop is not (as os.walk takes it), so that an entry segment never
    reads does not stop it."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _held(parent: Path, files: bool = False) -> str:
    """Up to four names of the subfolders ``parent`` holds (then of its files too, with ``files``), hidden ones left
    out; '' where it holds none or is no folder."""
    try:
        with os.scandir(parent) as listing:
            entries = [(not _is_folder(entry), entry.name) for entry in listing if not entry.name.startswith(".")]
    except OSError:
        return ""
    held = [name for is_file, name in sorted(entries) if files or not is_file]
    return listed(held, 4)


def _held_folders(folder: Path) -> str:
    """Words on what lies where a split folder ``folder`` is missing: the subfolders its parent holds (a set laid out
    as train/val, say, whose names segment does not read); where that parent (``images/``, ``annotations/``) is
    missing too, what the dataset root holds instead. '' where there is nothing to name."""
    parent = folder.parent
    if parent.is_dir():
        return f" ({parent.name}/ holds {held})" if (held := _held(parent)) else ""
    root = parent.parent
    held = _held(root, files=True)
    return f" ({root} has no {parent.name}/ folder; it holds {held or 'nothing'})" if root.is_dir() else ""


def _pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    images_dir, labels_dir = root / "images" / split, root / "annotations" / split
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder{_held_folders(folder)}; --data needs ADE20K's layout: "
                             f"images/{split}/*.jpg and annotations/{split}/*.png")
    with os.scandir(images_dir) as listing:
        entries = [(entry.name, _is_folder(entry)) for entry in listing]
    names = sorted(n for n, folder in entries if not folder and is_image_name(n) and not n.startswith("."))
    if hidden := sorted(n for n, folder in entries if not folder and is_image_name(n) and n.startswith(".")):
        log.warning("%s: %d hidden image file(s) not used, e.g. %s (as a folder search leaves a hidden file out); name "
                    "it and its annotation without a leading '.' to use them", images_dir, len(hidden), hidden[0])
    if nested := sorted(n for n, folder in entries if folder and not passed_over_folder(n)):  # else dropped unsaid
        log.warning("%s: %d subfolder(s) not searched, e.g. %s: segment pairs the files of images/%s itself with "
                    "annotations/%s (ADE20K's layout); move their images and annotations up to use them", images_dir,
                    len(nested), nested[0], split, split)
    images = {Path(n).stem: images_dir / n for n in names}
    if len(images) < len(names):
        stems = Counter(Path(n).stem for n in names)  # one count a stem: a sum over the names for each one took
        twins = sorted(n for n in names if stems[Path(n).stem] > 1)  # over 2 min on 20k images
        raise ValueError(f"images {twins[0]} and {twins[1]} in {images_dir} share the stem {Path(twins[0]).stem!r}, "
                         f"so one annotation would serve both; rename or remove one")
    listed = os.listdir(labels_dir)
    labels = {Path(n).stem: labels_dir / n for n in listed  # no hidden file (.NAME.png, ._NAME.png)
              if n.lower().endswith(".png") and is_image_name(n) and not n.startswith(".")}
    if not images:
        raise ValueError(f"{images_dir} holds no images (an empty split); add images with their annotations, or "
                         f"point --data at the dataset root")
    if missing := sorted(set(images) - set(labels)):
        # an annotation saved in another format (a JPEG, whose compression blurs the ids) is there but not read
        other = next((n for n in sorted(listed) if Path(n).stem == missing[0] and not n.startswith(".")), None)
        found = f"; {other} there is not read: annotations are PNGs of class ids" if other else ""
        raise ValueError(f"image {images[missing[0]]} has no annotation {labels_dir / (missing[0] + '.png')} "
                         f"({len(missing)} image(s) without one{found}); add it or remove the image")
    if orphans := sorted(set(labels) - set(images)):
        raise ValueError(f"annotation {labels[orphans[0]]} has no image in {images_dir} ({len(orphans)} "
                         f"annotation(s) without one); add the image or remove the annotation")
    return [(images[stem], labels[stem]) for stem in sorted(images)]


def eval_scale(height: int, width: int, crop: int) -> tuple[int, int]:
    """mmseg's test Resize(scale=(4·crop, crop), keep_ratio): the largest size whose long side is
    at most 4·crop and short side at most crop."""
    factor = min(4 * crop / max(height, width), crop / min(height, width))
    # mmcv rounds halves up (int(x + 0.5)); Python's round() rounds them to even: 1024 x 1365 gave 512 x 682, not 683
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def eval_input(image: torch.Tensor, crop: int) -> torch.Tensor:
    """uint8 (3, H, W) -> float (3, h, w) at :func:`eval_scale` (bilinear, antialiased), ImageNet-normalised: what a
    segmenter is evaluated on (``lomar segment``'s validation images, ``lomar predict``'s)."""
    return (_resize(image.float(), eval_scale(*image.shape[-2:], crop)) - MEAN) / STD


def _class_refusal(checked: list[tuple[tuple[Path, Path], tuple[int, int]]], split: str, num_classes: int,
                   reduce_zero_label: bool) -> str | None:
    """Why the checked pairs' class ids do not fit ``num_classes`` (each pair with its highest id and the ids it
    holds), naming the annotation that holds the highest; None when they fit."""
    if not checked:
        return None
    annotation, top = max(((label, result[0]) for (_, label), result in checked), key=lambda found: found[1])
    first = 1 if reduce_zero_label else 0  # the file's id of the first class
    if top > MAX_CLASS_ID:
        ignored = f"0 and {IGNORE}" if reduce_zero_label else f"{IGNORE}"
        return (f"annotation {annotation} holds class id {top}; ids are {first}..{MAX_CLASS_ID} for the classes, "
                f"{ignored} ignored; fix the annotations")
    if top <= num_classes - 1 + first:
        return None
    # over the whole split: the --num-classes to suggest is the highest id of all
    if reduce_zero_label:
        return (f"annotation {annotation} holds class id {top}, above --num-classes {num_classes} (ids: 0 ignored, "
                f"1..N the classes; {top} is the highest in {split}); pass --num-classes {top} or fix the annotations")
    return (f"annotation {annotation} holds class id {top}, above the ids 0..{num_classes - 1} of --num-classes "
            f"{num_classes} with --zero-label class (0..N-1 the classes, {IGNORE} ignored; {top} is the highest in "
            f"{split}); pass --num-classes {top + 1}, or --zero-label ignore if the ids are 1..N with 0 unlabelled, or "
            f"fix the annotations")


class SegmentationFolder(Dataset):
    """One split of an ADE20K-layout folder.

    ``train=True`` items: ``(image (3, crop, crop) float normalised, labels (crop, crop) long)``,
    mmseg's training pipeline (random resize of the test scale by 0.5-2.0, random crop with
    cat_max_ratio 0.75, flip, :func:`photometric_distortion` unless ``photometric=False``, padding
    with 0 / IGNORE), drawn from a generator seeded by (seed, epoch, index): keys are ``(index, epoch)``.
    ``train=False`` items:
    ``(image (3, h, w) at :func:`eval_scale`, labels (H, W) long at the file's size, stem)``.
    """

    def __init__(self, root: str | Path, split: str, num_classes: int, crop: int = 512, train: bool = True,
                 seed: int = 0, workers: int = 4, photometric: bool = True, reduce_zero_label: bool = True):
        self.root, self.split, self.num_classes, self.crop = Path(root), split, num_classes, crop
        self.train, self.seed, self.skipped, self.photometric = train, seed, set(), photometric
        self.reduce_zero_label = reduce_zero_label
        try:
            pairs = _pairs(self.root, split)
        except ValueError as exc:  # refused as a split, for segment to name with the other split's problems
            raise BadSplit(split, str(exc)) from None
        results, bad = pair_results(self.root, split, pairs, _check_pair, workers)
        checked = [(pair, result) for pair, result in zip(pairs, results) if result is not None]
        if reason := _class_refusal(checked, split, num_classes, reduce_zero_label):
            raise BadSplit(split, reason, bad)
        if bad is not None:
            raise bad
        first, held = (1 if reduce_zero_label else 0), 0  # the file's id of the first class; the ids of every pair
        for _, ids in results:
            held |= ids
        # the classes (0..N-1) some annotation holds: a validation one that no training one holds is never learnt
        self.classes_held = frozenset(i - first for i in range(first, num_classes + first) if held >> i & 1)

        # packed (lomar.data.pathtable): a list of Path pairs is copied into every loader worker that reads it
        self.images, self.labels = PathTable(image for image, _ in pairs), PathTable(label for _, label in pairs)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 image (3, H, W), long labels (H, W): 0..N-1 or IGNORE)."""
        image_path, label_path = self.images[index], self.labels[index]
        labels = torch.from_numpy(read_labels(label_path).astype(np.int64))
        if not self.reduce_zero_label:
            return load_image(image_path), labels
        return load_image(image_path), torch.where((labels == 0) | (labels == IGNORE), IGNORE, labels - 1)

    def __getitem__(self, key):
        index, epoch = sample_key(key)
        try:
            image, labels = self.load(index)
        except ValueError as exc:  # checked at start-up from the headers; the data may still be cut short
            return Skipped.warned(exc, index, self.skipped)
        if not self.train:
            return eval_input(image, self.crop), labels, self.images[index].stem
        return self._augment(image, labels, sample_generator(self.seed, epoch, index))

    def _augment(self, image: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        ratio = 0.5 + 1.5 * float(torch.rand((), generator=gen))
        height, width = eval_scale(*image.shape[-2:], self.crop)
        size = max(1, round(height * ratio)), max(1, round(width * ratio))
        image = _resize(image.float(), size)
        # at pixel centres, as the bilinear image: "nearest" (like mmseg's cv2 INTER_NEAREST) samples
        # floor(x * in / out), which puts the labels up to half a pixel right of and below the image
        labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
        crop = self.crop
        for _ in range(10):  # mmseg's cat_max_ratio: no crop mostly of one class, if 10 draws allow
            top = int(torch.randint(0, max(1, size[0] - crop + 1), (), generator=gen))
            left = int(torch.randint(0, max(1, size[1] - crop + 1), (), generator=gen))
            window = labels[top:top + crop, left:left + crop]
            counts = torch.bincount(window[window != IGNORE].flatten(), minlength=1)
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() < 0.75 * counts.sum():
                break
        image, labels = image[:, top:top + crop, left:left + crop], labels[top:top + crop, left:left + crop]
        if float(torch.rand((), generator=gen)) < 0.5:
            image, labels = image.flip(-1), labels.flip(-1)
        if self.photometric:
            image = photometric_distortion(image, gen)
        image = (image - MEAN) / STD
        pad_h, pad_w = crop - image.shape[1], crop - image.shape[2]
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            labels = F.pad(labels, (0, pad_w, 0, pad_h), value=IGNORE)
        return image, labels


def photometric_distortion(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a (3, H, W) RGB image in [0, 255]: each step with probability 1/2,
    brightness + U(-32, 32), contrast x U(0.5, 1.5) before or after (1/2 each) saturation x U(0.5, 1.5) and
    a hue shift by an integer in [-18, 17] (numpy's ``randint(-18, 18)``) of OpenCV's 0-180 hue scale;
    clipped to [0, 255] and truncated after each step as mmseg's uint8 ``convert`` does, in float arithmetic
    (not OpenCV's uint8 HSV tables)."""
    def coin() -> bool:
        return bool(torch.randint(0, 2, (), generator=gen))

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=gen))

    def contrast(img: torch.Tensor) -> torch.Tensor:
        return (img * uniform(0.5, 1.5)).clamp(0, 255).floor() if coin() else img

    image = (image + uniform(-32, 32)).clamp(0, 255).floor() if coin() else image
    contrast_first = coin()
    image = contrast(image) if contrast_first else image
    if coin():
        hue, sat, value = _rgb_to_hsv(image)
        image = _hsv_to_rgb(hue, (sat * uniform(0.5, 1.5)).clamp(max=1.0), value)
    if coin():
        hue, sat, value = _rgb_to_hsv(image)
        image = _hsv_to_rgb((hue + int(torch.randint(-18, 18, (), generator=gen))) % 180, sat, value)
    return image if contrast_first else contrast(image)


def _rgb_to_hsv(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(3, H, W) RGB in [0, 255] -> hue in [0, 180) (OpenCV's scale), saturation in [0, 1], value in [0, 255]."""
    r, g, b = image
    value, low = image.max(0).values, image.min(0).values
    delta = value - low
    sat = torch.where(value > 0, delta / value.clamp(min=1e-12), 0.0)
    safe = delta.clamp(min=1e-12)
    hue = torch.where(value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return torch.where(delta > 0, hue * 30, 0.0), sat, value


def _hsv_to_rgb(hue: torch.Tensor, sat: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv`, rounded to whole values in [0, 255] (as OpenCV's saturating cast)."""
    sector = hue / 30
    i, f = sector.floor() % 6, sector - sector.floor()
    p, q, t = value * (1 - sat), value * (1 - sat * f), value * (1 - sat * (1 - f))
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    out = torch.zeros(3, *hue.shape, dtype=hue.dtype)
    for k, channels in enumerate(choices):
        out = torch.where(i == k, torch.stack(channels), out)
    return out.clamp(0, 255).round()


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def collate_segmentation(batch: list) -> LabelledBatch:
    """Training items -> (images (B, 3, S, S), labels (B, S, S)), ``bad`` the skipped items' lines; a skipped
    item is replaced by the batch's others in turn, so the batch keeps its size; (empty, empty) when every
    item was skipped."""
    good, bad = split_skipped(batch)
    if not good:
        return LabelledBatch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
    good = refilled(good, len(batch))
    return LabelledBatch(torch.stack([image for image, _ in good]), torch.stack([labels for _, labels in good]), bad)
