"""Semantic segmentation evaluation: whole-image and sliding-window inference, and mmseg's
metrics (mIoU, mAcc, aAcc) from a confusion matrix.

The metrics follow mmsegmentation's ``IoUMetric``: per class IoU = TP / (TP + FP + FN) and
accuracy = TP / (TP + FN), averaged over the classes where they are defined (NaN skipped: a
class absent from the labels and the predictions has no IoU; one absent from the labels has no
accuracy); aAcc = correct / labelled pixels. Where every class occurs in the labels these equal
torchmetrics' macro ``MulticlassJaccardIndex`` / ``MulticlassAccuracy`` and micro accuracy (a
test checks it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lomar.values import percent_text

__all__ = ["confusion_matrix", "segmentation_metrics", "per_class_table", "lowest_classes",
           "predict_logits", "SLIDE_PIXELS", "slide_stride", "label_map", "label_png", "CLASS_CHUNK"]


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
                     ) -> torch.Tensor:
    """(N, N) int64 counts, rows the true class, columns the predicted; pixels labelled
    ``ignore_index`` skipped. pred, labels: integer tensors of one shape."""
    keep = labels != ignore_index
    index = labels[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def segmentation_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """{"mIoU", "mAcc", "aAcc"} in percent, and "IoU", "Acc" per class (lists in percent, NaN where undefined)."""
    cm = confusion.double()
    tp = cm.diag()
    labelled, predicted = cm.sum(1), cm.sum(0)
    # percent of counts in one division each (100 * 29 / 100 is 29.0, where 100 * (29 / 100) is 28.999999999999996)
    iou = 100 * tp / (labelled + predicted - tp)  # 0/0 = NaN: a class nowhere
    acc = 100 * tp / labelled
    total = float(cm.sum())

    def mean(x: torch.Tensor) -> float:
        x = x[~x.isnan()]
        return float(x.mean()) if len(x) else math.nan

    return {"mIoU": mean(iou), "mAcc": mean(acc), "aAcc": 100 * float(tp.sum()) / total if total else math.nan,
            "IoU": [float(v) for v in iou], "Acc": [float(v) for v in acc]}


def per_class_table(iou: list, acc: list, labels: list[str]) -> str:
    """mmseg's per-class table as Markdown: one row a class (``labels``: its id and, where known, name), IoU and
    accuracy in percent, n/a where undefined (None or NaN)."""
    rows = [f"| {label} | {percent_text(i)} | {percent_text(a)} |" for label, i, a in zip(labels, iou, acc)]
    return "\n".join(["| class | IoU | Acc |", "|---|---:|---:|", *rows]) + "\n"


def lowest_classes(iou: list, labels: list[str], count: int = 5) -> str:
    """The ``count`` classes of the lowest defined IoU, lowest first, as ``label: IoU`` pairs."""
    scored = sorted((v, n) for n, v in enumerate(iou) if v is not None and not math.isnan(v))
    return ", ".join(f"{labels[n]}: {percent_text(v)}" for v, n in scored[:count])


# Pixels of sliding windows run in one forward: four of mmseg's 512-pixel crops (their 150 fp32 ADE20K logits:
# 630 MB), so that a GPU runs several windows at once and memory stays bounded whatever the image's size
SLIDE_PIXELS = 4 * 512 * 512


@torch.no_grad()
def predict_logits(model, image: torch.Tensor, num_classes: int, mode: str = "whole", crop: int = 512,
                   stride: int = 341, size_divisor: int | None = None) -> torch.Tensor:
    """Logits (1, N, h, w) of one image (1, 3, h, w).

    ``whole``: the image padded (bottom/right) to a multiple of ``size_divisor`` (default: the model's
    ``size_divisor``, a :class:`~lomar.models.segmenter.UperNetSegmenter`'s coarsest stride, else 32),
    one forward.
    ``slide``: mmseg's ``slide_inference``: ``crop``-sized windows every ``stride`` pixels (the
    last one flush with the border), logits averaged where windows overlap; an image smaller
    than ``crop`` is padded to it. The windows, row by row, go through the model in batches
    (B, 3, crop, crop) of :data:`SLIDE_PIXELS` pixels at most (one window at least).
    """
    h, w = image.shape[-2:]
    if mode == "whole":
        size_divisor = size_divisor or getattr(model, "size_divisor", 32)
        pad_h, pad_w = -h % size_divisor, -w % size_divisor
        logits = model(F.pad(image, (0, pad_w, 0, pad_h)))
        return logits[..., :h, :w]
    if mode != "slide":
        raise ValueError(f"inference mode must be whole or slide, got {mode!r}")
    padded = F.pad(image, (0, max(0, crop - w), 0, max(0, crop - h)))
    ph, pw = padded.shape[-2:]
    rows = max(ph - crop + stride - 1, 0) // stride + 1
    cols = max(pw - crop + stride - 1, 0) // stride + 1
    origins = [(min(r * stride, ph - crop), min(c * stride, pw - crop)) for r in range(rows) for c in range(cols)]
    per_forward = max(1, SLIDE_PIXELS // (crop * crop))
    total = torch.zeros(1, num_classes, ph, pw, device=image.device)
    count = torch.zeros(1, 1, ph, pw, device=image.device)
    for first in range(0, len(origins), per_forward):
        batch = origins[first:first + per_forward]
        logits = model(torch.cat([padded[..., top:top + crop, left:left + crop] for top, left in batch])).float()
        for (top, left), window in zip(batch, logits):
            total[..., top:top + crop, left:left + crop] += window
            count[..., top:top + crop, left:left + crop] += 1
    return (total / count)[..., :h, :w]


def slide_stride(stride: int | None, crop: int) -> int:
    """The sliding windows' stride of a run's ``--eval-stride`` (None: 2/3 of its ``crop``, mmseg's 341 at 512)."""
    return stride or crop * 2 // 3


# Classes resized to the labels' size at once: all 150 of ADE20K at a 12 MP photo's size would be 7.2 GB of float
CLASS_CHUNK = 16


def label_map(model, image: torch.Tensor, size: tuple[int, int], num_classes: int, mode: str, crop: int,
              stride: int) -> torch.Tensor:
    """(H, W) int64 classes 0..N-1 of one normalised image (1, 3, h, w): its :func:`predict_logits` resized
    (bilinear) to ``size`` (H, W), the labels' or the photo's own, then the most likely class of each pixel (the
    first of equal ones, NaN the most, as ``argmax``), taken over :data:`CLASS_CHUNK` classes at a time."""
    logits = predict_logits(model, image, num_classes, mode, crop, stride).float()
    best = labels = None
    for first in range(0, logits.shape[1], CLASS_CHUNK):
        chunk = F.interpolate(logits[:, first:first + CLASS_CHUNK], size=size, mode="bilinear", align_corners=False)
        value, index = chunk.max(1)
        if best is None:
            best, labels = value, index
            continue
        better = (value > best) | (value.isnan() & ~best.isnan())  # ties keep the earlier class
        best, labels = torch.where(better, value, best), torch.where(better, index + first, labels)
    return labels[0].cpu()


def label_png(labels: torch.Tensor, zero_label: str) -> bytes:
    """An (H, W) map of classes 0..N-1 as an 8-bit PNG in its run's annotations' encoding: class + 1 where the
    annotations' 0 is unlabelled (``zero_label`` ignore, ADE20K's), the class itself where 0 is a class."""
    from torchvision.io import encode_png  # torchvision imports torch._dynamo (about a second): only when written

    first_id = 1 if zero_label == "ignore" else 0
    return encode_png((labels + first_id).to(torch.uint8)[None]).numpy().tobytes()
