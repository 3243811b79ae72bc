"""``lomar predict``'s work: a trained classifier, detector or segmenter (a ``lomar finetune``, ``detect`` or
``segment`` checkpoint, :func:`load_trained`; a classifier of ``lomar linprobe --save``, its images read as linprobe
reads them, :func:`~lomar.eval.features.eval_transform`) run on image files (:func:`list_images`), each image read and
preprocessed as its command's evaluation reads a validation image, its answers returned for the command to write.

- classifier: finetune's evaluation transform (:func:`~lomar.data.classify.classification_eval_transform`, at the
  size it was trained at); each image's top-k classes and softmax probabilities.
- detector: detect's evaluation input (the image as float in [0, 1]; the model resizes and pads); COCO result
  entries (:func:`~lomar.eval.coco.to_coco_results`), boxes in the image's pixels.
- segmenter: segment's evaluation input (:func:`~lomar.data.segmentation.eval_input`) and inference
  (:func:`~lomar.eval.segmentation.label_map`, the run's mode and stride); a label map at the image's size as a PNG
  in its run's annotations' encoding.

Each model's forward runs in the ``autocast`` context its caller gives (the precision ``lomar predict`` resolved).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lomar.checkpoints.export_leftovers import readable_file
from lomar.checkpoints.file_names import LAST
from lomar.checkpoints.formats import VitReader, read, saved_class_names
from lomar.checkpoints.formats_beit import BEiTFinetuneReader
from lomar.checkpoints.formats_probe import LinprobeReader
from lomar.checkpoints.kinds import LINPROBE_FORMAT, run_command
from lomar.checkpoints.original import TimmLayoutReader
from lomar.data.class_names import names_problem
from lomar.data.collate import Skipped
from lomar.data.decode import load_image, tensor_to_pil
from lomar.data.image_names import IMAGE_EXTENSIONS
from lomar.data.image_search import image_table
from lomar.data.segmentation import eval_input
from lomar.errors import UsageError
from lomar.eval.coco import to_coco_results
from lomar.eval.features import eval_load, eval_transform
from lomar.eval.segmentation import label_map, label_png, slide_stride
from lomar.progress_bar import progress
from lomar.values import command_line

__all__ = ["Trained", "load_trained", "list_images", "ListedImage", "classify", "detect", "segment", "OUTPUTS"]

# The file each kind writes in --out; a segmenter writes one PNG per image instead.
OUTPUTS = {"classifier": "predictions.jsonl", "detector": "predictions.json"}
_KINDS = {"finetune": "classifier", "linprobe": "classifier", "detect": "detector", "segment": "segmenter"}
# a detector's batch of images at their own size, as float: 384 MiB (three 12 MP photos; sixteen 640 x 480: 5 M px)
BATCH_PIXELS = 2**25


@dataclass
class Trained:
    """A trained model as its checkpoint rebuilt it: ``kind`` (classifier, detector, segmenter), ``model`` (in eval
    mode), ``path`` (the file read) and ``checkpoint`` (what the file holds besides the weights: the run's settings,
    a classifier's classes, a detector's categories)."""

    kind: str
    model: nn.Module
    path: Path
    checkpoint: dict

    @property
    def labels(self) -> list:
        """Each output's name: a classifier's class names (its head rows' indices where it saved none); a detector's
        category names (its COCO category ids where it saved none)."""
        if self.kind == "classifier":
            return list(self.checkpoint.get("classes") or range(self.model.num_classes))
        return list(self.checkpoint.get("category_names") or self.checkpoint["categories"])


def load_trained(path: str | Path) -> Trained:
    """The classifier, detector or segmenter at ``path`` (a checkpoint of `lomar finetune`, `detect` or `segment`, or
    a run folder of one; a probe `lomar linprobe --save` wrote). UsageError in one line for what predict cannot run,
    naming the command that can use it."""
    # what every reader reads of it: a run folder without an export its best.pt, else last.pt (a stopped pretraining
    # run's too, refused as one); a finished pretraining run's its export (refused as one). read() is given the path
    # itself, whose refusal of a run folder's damaged best.pt names its last.pt
    file = readable_file(Path(path))
    try:
        reader, src = read(path)
        command = run_command(src.data)
        if command in ("detect", "segment"):
            model = reader.model(src, {})
        elif isinstance(reader, BEiTFinetuneReader) or (isinstance(reader, (VitReader, TimmLayoutReader))
                                                         and "head.weight" in src.state):
            # finetune's (a ViT or a BEiT), a converted classifier, a timm one (in lomar's layout or another)
            model, command = reader.model(src, {}), "finetune"
        elif isinstance(reader, LinprobeReader):
            model, command = reader.model(src, {}), "linprobe"
        else:
            raise UsageError(_cannot_run(file, reader.name, command))
    except (ValueError, FileNotFoundError) as exc:  # the reader's own words name the file
        raise UsageError(str(exc)) from None
    data = {k: v for k, v in src.data.items() if k != "model"}
    if command in ("finetune", "linprobe"):
        names = saved_class_names(src)
        if names is not None and (problem := names_problem(names, model.num_classes)):
            raise UsageError(f"{file}: its classes {problem}; fix its 'classes'")
        data["classes"] = list(names) if names is not None else None
    return Trained(_KINDS[command], model.eval(), file, data)


def _cannot_run(file: Path, reader: str, command: str | None) -> str:
    """The refusal of a checkpoint that predicts nothing: what it is and the commands that make one of it that does,
    the quickest first (a linear probe: features once, then seconds of fitting)."""
    probe = command_line("lomar", "linprobe", file, "--data", "ROOT", "--save", "probe.pt")
    if reader.startswith("export") or reader in ("lomar-vit", TimmLayoutReader.name):
        # a finished pretraining run's folder is read as the export it holds beside its checkpoints
        what = ("a pretraining run's folder, whose exported encoder" if file.is_dir() and (file / LAST).is_file()
                else "an exported encoder, which" if reader.startswith("export")
                else "an encoder without a classifier's head, which")
        return (f"{file} is {what} predicts no labels; pass a probe on it ({probe}, the quickest) or the "
                f"best.pt of the `lomar finetune`, `lomar detect` or `lomar segment` run that trains one on it "
                f"({command_line('--pretrained', file)})")
    what = ("a pretraining checkpoint" if command == "pretrain" or "pretrain" in reader else
            "an original pretraining checkpoint" if reader.startswith("original") else
            f"a checkpoint in the {reader} format")
    return (f"{file} is {what}, which predicts no labels; train a probe on it ({probe}, the quickest) and pass "
            f"probe.pt, or a classifier, detector or segmenter (lomar finetune / detect / segment "
            f"{command_line('--pretrained', file)}) and pass that run's best.pt; "
            f"{command_line('lomar', 'visualize', file, 'IMAGE')} draws what it reconstructs")


@dataclass(frozen=True)
class ListedImage:
    """An image to predict: ``path`` as found, and ``name``, its path below the folder it was found in (a file given
    itself: its file name), without its suffix: the name of a segmenter's PNG in --out."""

    path: str
    name: str


def list_images(paths: list[str], limit: int | None = None) -> list[ListedImage]:
    """Each file given, and each folder's images as the training commands search a folder
    (:func:`~lomar.data.image_search.image_table`: recursively, sorted, hidden files and thumbnail caches left out),
    in the order given; a file listed twice, under any spelling (relative, absolute, through a link), is predicted
    once, under the first. Past ``limit`` distinct images, the listing stops: some ``limit`` + 1 or more of them.
    UsageError for a folder without an image."""
    listed: dict[tuple[int, int] | str, ListedImage] = {}
    for given in map(Path, paths):
        if limit is not None and len(listed) > limit:
            break
        if given.is_dir():
            found = image_table(given, limit)  # whole unless past limit alone, whatever the others share with it
            if not found:
                raise UsageError(f"no images found in {given}; supported extensions: {', '.join(IMAGE_EXTENSIONS)}")
            images = [ListedImage(str(image), str(Path(image).relative_to(given).with_suffix(""))) for image in found]
        else:
            images = [ListedImage(str(given), given.stem)]
        for image in images:
            listed.setdefault(_file_identity(image.path), image)
    return list(listed.values())


def _file_identity(path: str) -> tuple[int, int] | str:
    """(device, inode) of the file at ``path``; a path that cannot be read: its real path (a dangling link's target)."""
    try:
        info = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return info.st_dev, info.st_ino


class _ImageFiles(Dataset):
    """Item ``i``: ``(i, prepare(uint8 (3, H, W) image))``, or a :class:`~lomar.data.collate.Skipped` line for a file
    that cannot be read (warned of as a training run warns of one)."""

    def __init__(self, images: list[ListedImage], prepare: Callable[[torch.Tensor], object], load=load_image):
        self.images, self.prepare, self.load, self.warned = images, prepare, load, set()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            image = self.load(self.images[index].path)
        except (ValueError, RuntimeError, OSError) as exc:
            return Skipped.warned(exc, index, self.warned)
        # not under the except: a decoded image is no fault of the file
        return index, self.prepare(image)


def _as_list(batch: list) -> list:
    return batch


# module-level (with partial): a loader worker started by spawn pickles what it runs
def _classifier_input(transform, image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> finetune's evaluation input (3, S, S): ``transform`` takes a PIL image, as timm's do."""
    return transform(tensor_to_pil(image))


def _segmenter_input(crop: int, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 (3, H, W) -> (segment's evaluation input (3, h, w), (H, W): the size its label map is given)."""
    return eval_input(image, crop), tuple(image.shape[-2:])


def _batches(images: list[ListedImage], prepare, batch_size: int, workers: int, skipped: list[str],
             load=load_image, pixels: int | None = None) -> Iterator[tuple[list[int], list]]:
    """(indices, prepared inputs) of each batch of the readable ``images``, with a progress bar; the unreadable ones'
    lines appended to ``skipped``. ``pixels``: where given, the images are read one at a time and a batch of
    (C, H, W) inputs holds at most that many pixels (an input larger alone)."""
    loader = DataLoader(_ImageFiles(images, prepare, load), batch_size if pixels is None else 1, num_workers=workers,
                        collate_fn=_as_list)
    held: list = []
    for batch in progress(loader, total=len(loader), desc="lomar predict", unit="batch" if pixels is None else "image"):
        skipped.extend(item for item in batch if isinstance(item, Skipped))
        for item in batch:
            if isinstance(item, Skipped):
                continue
            if held and pixels is not None and sum(_pixels(value) for _, value in [*held, item]) > pixels:
                yield [index for index, _ in held], [value for _, value in held]
                held = []
            held.append(item)
        if held and (pixels is None or len(held) == batch_size):
            yield [index for index, _ in held], [value for _, value in held]
            held = []
    if held:
        yield [index for index, _ in held], [value for _, value in held]


def _pixels(image: torch.Tensor) -> int:
    return image.shape[-2:].numel()


def classify(trained: Trained, images: list[ListedImage], device: torch.device, top_k: int, batch_size: int,
             workers: int, skipped: list[str], autocast: Callable[[], contextlib.AbstractContextManager]
             ) -> list[dict]:
    """One row per readable image: ``{"path", "top_k": [{"class", "probability"}, ...]}``, the ``top_k`` most probable
    classes first (softmax of the float logits); ``autocast``: the run's precision's context."""
    # timm, and torchvision with it, import torch._dynamo (about a second): only for a classifier
    from lomar.data.classify import classification_eval_transform, draft_eval_load

    model, labels = trained.model.to(device), trained.labels
    # a probe's images as linprobe read them, a finetuned classifier's as finetune evaluates
    size = model.config.img_size
    if trained.checkpoint.get("format") == LINPROBE_FORMAT:
        draft = trained.checkpoint.get("decode") == "draft"
        transform, load = eval_transform(size), eval_load(size, "draft" if draft else "full")
    else:
        transform = classification_eval_transform(size)
        settings = trained.checkpoint.get("settings") or {}
        load = (draft_eval_load(transform) if settings.get("decode") == "draft" else None) or load_image
    rows = []
    with torch.no_grad():
        for indices, inputs in _batches(images, partial(_classifier_input, transform), batch_size, workers, skipped,
                                        load):
            with autocast():
                logits = model(torch.stack(inputs).to(device))
            found = logits.float().softmax(1).topk(min(top_k, logits.shape[1]), dim=1)
            for index, values, rows_of in zip(indices, found.values.tolist(), found.indices.tolist()):
                rows.append({"path": images[index].path, "top_k": [
                    {"class": labels[row], "probability": round(value, 6)} for value, row in zip(values, rows_of)]})
    return rows


def detect(trained: Trained, images: list[ListedImage], device: torch.device, score_threshold: float,
           batch_size: int, workers: int, skipped: list[str],
           autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> list[dict]:
    """COCO result entries of the readable images (detect's predictions.json form: ``bbox`` [x, y, w, h] in the
    image's pixels, ``score``, ``category_id``, ``segmentation`` as RLE), each with the image's path as its
    ``image_id`` and its ``category_name`` where the run saved names; those scored below ``score_threshold`` left
    out. A batch holds at most ``batch_size`` images and BATCH_PIXELS pixels; masks are pasted a few at a time
    (:func:`~lomar.models.mask_rcnn.unpasted_masks`), in fp32 outside ``autocast``, the forward's context."""
    from lomar.data.jitter import eval_transforms  # torchvision imports torch._dynamo: only for a detector
    from lomar.models.mask_rcnn import unpasted_masks  # torchvision, as above

    model, transform = trained.model.to(device), eval_transforms()
    categories = list(trained.checkpoint["categories"])
    names = dict(zip(categories, trained.labels))
    results = []
    with torch.no_grad(), unpasted_masks(model):
        for indices, inputs in _batches(images, transform, batch_size, workers, skipped, pixels=BATCH_PIXELS):
            with autocast():
                outputs = model([image.to(device) for image in inputs])
            for index, image, output in zip(indices, inputs, outputs):
                for entry in to_coco_results(output, images[index].path, categories,
                                             image_size=tuple(image.shape[-2:])):
                    if entry["score"] >= score_threshold:
                        if trained.checkpoint.get("category_names"):
                            entry["category_name"] = names[entry["category_id"]]
                        results.append(entry)
    return results


def segment(trained: Trained, images: list[ListedImage], device: torch.device, mode: str, workers: int,
            skipped: list[str], autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
            ) -> Iterator[tuple[ListedImage, bytes]]:
    """Each readable image and its label map at its own size as a PNG in the run's annotations' encoding (its
    ``zero_label``: class + 1 where 0 is unlabelled), inferred in ``mode`` (whole or slide) at the run's size and
    stride; one image at a time (images differ in size), its sliding windows batched as segment evaluates;
    ``autocast``: its context (the logits are resized and compared in fp32 whatever it is)."""
    settings = trained.checkpoint["settings"]
    crop, classes = settings["img_size"], settings["num_classes"]
    zero_label = settings.get("zero_label", "ignore")  # as segment reads a checkpoint that saved none: ADE20K's ids
    stride = slide_stride(settings.get("eval_stride"), crop)
    model = trained.model.to(device)
    with torch.no_grad():
        for indices, inputs in _batches(images, partial(_segmenter_input, crop), 1, workers, skipped):
            (index,), ((image, size),) = indices, inputs
            with autocast():
                labels = label_map(model, image[None].to(device), tuple(size), classes, mode, crop, stride)
            yield images[index], label_png(labels, zero_label)
