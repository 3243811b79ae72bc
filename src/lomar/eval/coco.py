"""COCO box and mask AP by pycocotools, from a detector's outputs, as detectron2 reports them.

Predictions become a COCO results list (``image_id``, ``category_id``, ``bbox`` [x, y, w, h],
``score``, ``segmentation`` as RLE with a text ``counts``), the format ``COCO.loadRes`` reads, so
the written ``predictions.json`` can be re-scored by anyone. As detectron2 does, box AP is
scored from ``bbox`` and mask AP from ``segmentation`` with ``bbox`` dropped (pycocotools would
otherwise take the area ranges of the mask AP from the boxes).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["to_coco_results", "coco_metrics", "METRIC_NAMES"]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# masks pasted at an image's size at once: 176 MiB with the float, stacked, thresholded and encoder's copies
PASTE_PIXELS = 2**24


def to_coco_results(output: dict[str, torch.Tensor], image_id: int, categories: list[int],
                    mask_threshold: float = 0.5, image_size: tuple[int, int] | None = None) -> list[dict]:
    """One image's detections -> COCO result entries.

    output: {"boxes" (N, 4) xyxy, "labels" (N,) in 1..K, "scores" (N,), "masks" (N, 1, H, W) in
    [0, 1]} in the image's own pixels; ``categories[label - 1]`` is the COCO category id. With ``image_size``
    (H, W), "masks" are the mask head's (N, 1, M, M) over the boxes
    (:func:`~lomar.models.mask_rcnn.unpasted_masks`), pasted as torchvision pastes them, PASTE_PIXELS at a time.
    """
    from pycocotools import mask as mask_utils

    boxes = output["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].cpu().tolist()
    results = []
    masks = output.get("masks")
    rles = None
    if masks is not None and len(masks):
        rles = []
        for chunk in ([masks] if image_size is None else _pasted(masks, output["boxes"], image_size)):
            binary = (chunk[:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
            rles.extend(mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))))
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        entry = {"image_id": image_id, "category_id": categories[label - 1], "bbox": [round(v, 3) for v in box],
                 "score": round(float(score), 6)}
        if rles is not None:
            rle = rles[i]
            entry["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        results.append(entry)
    return results


def _pasted(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> Iterator[torch.Tensor]:
    """(N, 1, M, M) masks over ``boxes`` (N, 4) -> (n, 1, H, W) fp32 chunks of them pasted into ``image_size``
    (H, W), n * H * W at most PASTE_PIXELS (n at least 1). fp32 whatever the masks' dtype: a bf16 autocast forward's
    (8 significant bits) would otherwise be resampled in bf16."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image  # torchvision: only for masks to paste

    step = max(1, PASTE_PIXELS // (image_size[0] * image_size[1]))
    for start in range(0, len(masks), step):
        yield paste_masks_in_image(masks[start:start + step].float(), boxes[start:start + step].float(),
                                   tuple(image_size))


def _no_detections(gt):
    """An empty results set over ``gt``'s images (``loadRes`` refuses an empty list): scored, each AP is 0 where
    there is ground truth to find and undefined where there is none, as for any other results."""
    from pycocotools.coco import COCO

    empty = COCO()
    empty.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
    empty.createIndex()
    return empty


def _score(gt, results: list[dict], kind: str, image_ids: list[int] | None) -> list[float | None]:
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        predictions = gt.loadRes(copy.deepcopy(results)) if results else _no_detections(gt)
        evaluator = COCOeval(gt, predictions, kind)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # -1: no ground truth in that area range; reported as None (JSON null), not as a score
    return [float(v) * 100 if v >= 0 else None for v in evaluator.stats[:len(METRIC_NAMES)]]


def coco_metrics(gt, results: list[dict], image_ids: list[int] | None = None) -> dict[str, float | None]:
    """{"box_AP", "box_AP50", ..., "mask_APl"} in percent. ``gt``: a pycocotools ``COCO``; ``image_ids``: the
    images the detector saw (default: all of ``gt``'s), so that one it could not read is left out of the
    scores rather than having its objects counted as missed."""
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    metrics = {f"box_{name}": value for name, value in zip(METRIC_NAMES, _score(gt, boxes, "bbox", image_ids))}
    if not results or "segmentation" in results[0]:
        masks = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        scores = _score(gt, masks, "segm", image_ids)
        metrics.update({f"mask_{name}": value for name, value in zip(METRIC_NAMES, scores)})
    return metrics
