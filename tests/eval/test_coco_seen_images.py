"""COCO AP over the images a detector saw (:func:`lomar.eval.coco.coco_metrics`'s ``image_ids``): an image it could
not read is left out of the scores, its objects not counted as missed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from lomar.eval.coco import coco_metrics, to_coco_results

HEIGHT, WIDTH = 24, 32


def _square() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[2:12, 2:12] = 1
    return mask


def _ground_truth() -> COCO:
    rle = mask_utils.encode(np.asfortranarray(_square()))
    segmentation = {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode("ascii")}
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": WIDTH, "height": HEIGHT} for i in (1, 2)],
                  "categories": [{"id": 1, "name": "a"}],
                  "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100,
                                   "segmentation": segmentation, "iscrowd": 0} for i in (1, 2)]}
    gt.createIndex()
    return gt


def test_an_image_the_detector_did_not_see_is_left_out_of_the_scores():
    output = {"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0]]), "labels": torch.tensor([1]),
              "scores": torch.tensor([0.9]), "masks": torch.from_numpy(_square()).float()[None, None]}
    results = to_coco_results(output, image_id=1, categories=[1])  # image 2 was never read
    seen = coco_metrics(_ground_truth(), results, image_ids=[1])
    assert seen["box_AP"] == pytest.approx(100.0) and seen["mask_AP"] == pytest.approx(100.0)
    every = coco_metrics(_ground_truth(), results)  # image 2's object counted as missed
    assert every["box_AP"] < 60 and every["mask_AP"] < 60
