"""COCO annotations at train2017's scale: packed per image, so that forked loader workers share them, with the
targets pycocotools' index gave."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from test_pathtable import _copied_by_reading
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VisionDataset, wrap_dataset_for_transforms_v2

from lomar.data.coco import (
    CocoInstances,
    CocoSplit,
    DetectionSamples,
    detection_dataset,
    read_coco,
    training_split,
)
from lomar.data.decode import load_image
from lomar.data.jitter import eval_transforms, train_transforms
from lomar.data.records import IntTable, PackedRecords


def _polygon(rng: random.Random, width: int, height: int) -> list[float]:
    return [round(rng.uniform(0, width if j % 2 == 0 else height), 2) for j in range(2 * rng.randint(6, 40))]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps_rollup")
def test_forked_workers_do_not_copy_the_coco_annotations(monkeypatch):
    # 200 images of COCO's 7 objects (3 polygons of 6-40 points each): a worker reading their targets through
    # pycocotools' index wrote to every annotation's objects (refcounts) and grew 7.3 MiB here, 505 MiB over 30k
    # images (208k objects of one polygon); reading packed records: 0.6-0.8 MiB here, 30 MiB over the 30k. The
    # allocator's churn varies by up to 2 MiB between runs (a CI run measured 2.1 in test_segmentation's twin)
    rng, size = random.Random(0), (16, 12)
    images = [{"id": 7 * i + 3, "file_name": f"{i}.jpg", "width": size[0], "height": size[1]} for i in range(200)]
    annotations = [{"id": len(images) * k + i, "image_id": image["id"], "category_id": 1 + k % 3, "iscrowd": 0,
                    "bbox": [1.0, 1.0, 8.0, 6.0], "area": 40.0, "segmentation": [_polygon(rng, *size) for _ in "abc"]}
                   for k in range(7) for i, image in enumerate(images)]
    data = {"images": images, "annotations": annotations, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    split = CocoSplit(Path("ann.json"), Path("images"), data, [1, 2, 3])
    monkeypatch.setattr("lomar.data.coco.load_image", lambda path: torch.zeros(3, size[1], size[0], dtype=torch.uint8))
    dataset = detection_dataset(split, None, train=True)
    del split, data, annotations
    copied = _copied_by_reading(dataset.__getitem__, len(images))
    assert copied < 3.5, copied


class _Pycocotools(CocoDetection):
    """The detection dataset as it was built on pycocotools' index: the targets to keep."""

    def __init__(self, split: CocoSplit, transforms=None):
        VisionDataset.__init__(self, str(split.root), transforms=transforms)
        self.coco, self.ids = COCO(), [image["id"] for image in split.data["images"]]
        self.coco.dataset = copy.deepcopy(split.data)  # the targets (split.coco() is the file's, to score against)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.label_of = {cat: i + 1 for i, cat in enumerate(split.categories)}

    def _load_image(self, id):  # noqa: A002
        return tv_tensors.Image(load_image(Path(self.root) / self.coco.loadImgs(id)[0]["file_name"]))

    def _load_target(self, id):  # noqa: A002
        return [{**a, "category_id": self.label_of[a["category_id"]]} for a in super()._load_target(id)]


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return type(a) is type(b) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def test_targets_are_those_of_pycocotools_index(tmp_path):
    rng, width, height = random.Random(1), 40, 30
    (tmp_path / "images").mkdir()
    data = {"images": [], "annotations": [], "categories": [{"id": 9, "name": "a"}, {"id": 4, "name": "b"}]}
    for i, image_id in enumerate([12, 5, 40, 7]):  # not in id order; image 40 has no annotation
        pixels = np.random.default_rng(i).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{image_id}.png")
        data["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
    for k in range(12):  # interleaved across the images, as a file lists them
        image_id = (12, 5, 7)[k % 3]
        seg = [_polygon(rng, width, height) for _ in range(1 + k % 2)]
        ann = {"id": 100 - k, "image_id": image_id, "category_id": (9, 4)[k % 2], "bbox": [2.5, 3.0, 20.0, 15.25],
               "segmentation": seg, "iscrowd": 0}
        if k == 5:
            ann.update(iscrowd=1, segmentation={"size": [height, width], "counts": [100, 50, width * height - 150]})
        data["annotations"].append(ann)
    (tmp_path / "ann.json").write_text(json.dumps(data))
    split = read_coco(tmp_path / "ann.json", tmp_path / "images")
    assert [CocoInstances(split)[i][1] for i in range(4)] == [_Pycocotools(split)[i][1] for i in range(4)]
    for use, transforms, keys, seed in ((training_split(split), train_transforms(32, (0.5, 2.0)),
                                         {"image_id", "boxes", "labels", "masks"}, 3),
                                        (split, eval_transforms(), {"image_id"}, None)):
        ours = detection_dataset(use, transforms, train=seed is not None, seed=seed)
        theirs = DetectionSamples(wrap_dataset_for_transforms_v2(_Pycocotools(use, transforms), keys), seed)
        assert len(ours) == len(theirs)
        for key in [(i, epoch) for epoch in (0, 1) for i in range(len(ours))]:
            assert _equal(ours[key], theirs[key]), key


def test_packed_records_are_a_sequence():
    records = PackedRecords([("a.jpg", 640, 480.5, [{"bbox": [0.1, 2.0], "segmentation": {"counts": "ab"}}]), None])
    assert len(records) == 2 and records[-1] is None and records[0] == records[0] and records[0] is not records[0]
    assert records[0][3][0]["bbox"] == [0.1, 2.0] and list(records[1:]) == [None]
    with pytest.raises(IndexError):
        records[2]
    ids = IntTable([5, 2**70, -1])  # JSON ids have no bound
    assert list(ids) == [5, 2**70, -1] and type(ids[0]) is int and list(IntTable([3, 4])[1:]) == [4]
