"""COCO box and mask AP on hand-built cases, against what pycocotools itself makes of them: perfect detections
score 100 whatever the segmentation's form (polygons, RLE) and the category ids; crowd regions and images without
annotations are handled as COCO handles them; no detection at all scores as pycocotools scores it; mask AP's area
ranges read the masks' areas, box AP's the boxes'; only the images the detector saw are scored."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from lomar.data.coco import read_coco
from lomar.eval.coco import METRIC_NAMES, coco_metrics, to_coco_results

HEIGHT, WIDTH = 37, 53  # odd sizes: a transposed mask or a swapped size would show
CATEGORIES = [1, 3, 90]  # not contiguous: labels 1, 2, 3


def _box_mask(x1, y1, x2, y2) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def _rle(mask: np.ndarray, compressed: bool = True) -> dict:
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode("ascii")}
    flat = mask.flatten(order="F")  # COCO's uncompressed crowd RLE: runs of 0s and 1s, column-major, 0s first
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": [HEIGHT, WIDTH], "counts": ([0] if flat[0] else []) + runs}


SQUARE = _box_mask(3, 5, 30, 20)
CROWD = _box_mask(40, 0, 52, 10)
POLYGON = [[31.0, 22.0, 50.0, 22.0, 50.0, 35.0, 31.0, 35.0]]


@pytest.fixture
def split(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(images / name)
    data = {
        "images": [{"id": 7, "file_name": "a.png", "width": WIDTH, "height": HEIGHT},
                   {"id": 9, "file_name": "b.png", "width": WIDTH, "height": HEIGHT},
                   {"id": 11, "file_name": "c.png", "width": WIDTH, "height": HEIGHT}],  # no annotation
        "categories": [{"id": c, "name": str(c)} for c in CATEGORIES],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [3, 5, 27, 15], "segmentation": _rle(SQUARE),
             "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 90, "bbox": [31, 22, 19, 13], "segmentation": POLYGON,
             "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 1, "bbox": [3, 5, 27, 15], "segmentation": _rle(SQUARE, False),
             "iscrowd": 0},
            {"id": 4, "image_id": 9, "category_id": 1, "bbox": [40, 0, 12, 10], "segmentation": _rle(CROWD, False),
             "iscrowd": 1}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return read_coco(path, images)


def _output(boxes, categories, masks, scores=None) -> dict[str, torch.Tensor]:
    """A detector's output for one image: xyxy boxes, labels 1..K, masks (N, 1, H, W) in [0, 1]."""
    return {"boxes": torch.tensor(boxes, dtype=torch.float), "scores": torch.tensor(scores or [0.9] * len(boxes)),
            "labels": torch.tensor([CATEGORIES.index(c) + 1 for c in categories]),
            "masks": torch.tensor(np.stack(masks), dtype=torch.float)[:, None]}


def _perfect() -> list[dict]:
    polygon = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(POLYGON, HEIGHT, WIDTH)))
    return (to_coco_results(_output([[3, 5, 30, 20], [31, 22, 50, 35]], [3, 90], [SQUARE, polygon]), 7, CATEGORIES)
            + to_coco_results(_output([[3, 5, 30, 20]], [1], [SQUARE]), 9, CATEGORIES))


def test_perfect_detections_score_100_with_any_segmentation_form_and_category_ids(split):
    results = _perfect()
    assert [r["category_id"] for r in results] == [3, 90, 1]
    assert results[0]["bbox"] == [3, 5, 27, 15]  # xyxy out of the detector, xywh into COCO
    metrics = coco_metrics(split.coco(), results)
    for kind in ("box", "mask"):
        assert [metrics[f"{kind}_{m}"] for m in ("AP", "AP50", "AP75", "APs")] == pytest.approx([100.0] * 4)
        assert metrics[f"{kind}_APm"] is metrics[f"{kind}_APl"] is None  # no ground truth of those sizes


def test_a_detection_of_a_crowd_region_is_ignored_and_one_on_an_empty_image_is_a_false_positive(split):
    crowd = to_coco_results(_output([[40, 0, 52, 10]], [1], [CROWD], [0.99]), 9, CATEGORIES)
    assert coco_metrics(split.coco(), _perfect() + crowd)["box_AP"] == pytest.approx(100.0)
    stray = to_coco_results(_output([[3, 5, 30, 20]], [1], [SQUARE], [0.95]), 11, CATEGORIES)
    metrics = coco_metrics(split.coco(), _perfect() + stray)
    assert metrics["box_AP"] == metrics["mask_AP"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)  # category 1: AP 0.5


def test_no_detection_at_all_scores_as_pycocotools_does(split):
    # 0 where there is ground truth to find; undefined (None) in the size ranges that hold none, as with detections
    metrics = coco_metrics(split.coco(), [])
    for kind in ("box", "mask"):
        assert [metrics[f"{kind}_{m}"] for m in METRIC_NAMES] == [0.0, 0.0, 0.0, 0.0, None, None]


def test_an_area_left_out_is_the_masks_as_coco_defines_it(split, tmp_path):
    # a disc's box is 4/pi times its area: the box's area put objects in the wrong APs/m/l range
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    disc = (((yy - 18) ** 2 + (xx - 26) ** 2) <= 15 ** 2).astype(np.uint8)
    data = json.loads(split.path.read_text())
    data["annotations"][0].update(segmentation=_rle(disc), bbox=[11, 3, 31, 31])
    path = tmp_path / "disc.json"
    path.write_text(json.dumps(data))
    read = read_coco(path, split.root)
    areas = {a["id"]: a["area"] for a in read.data["annotations"]}
    # COCOeval fails (KeyError) on a ground truth without one: it scores the same areas
    assert {a["id"]: a["area"] for a in read.coco().dataset["annotations"]} == areas
    assert "4 areas left out of the file taken from the masks" in read.summary.line()
    assert areas[1] == disc.sum() and areas[1] != 31 * 31
    assert areas[2] == mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(POLYGON, HEIGHT, WIDTH)))
    assert areas[3] == SQUARE.sum() and areas[4] == CROWD.sum()  # uncompressed RLEs


def test_an_evaluation_shares_the_splits_masks_and_leaves_them_as_they_were(split):
    """Each evaluation's index copies the split's entries, not their polygons and RLEs (a deep copy took 6.4 s an
    evaluation on a val2017-sized split); pycocotools sets the copies' keys, never changes what they share."""
    before = json.dumps(split.data)
    first, second = (coco_metrics(split.coco(), _perfect()) for _ in range(2))
    assert first == second and first["mask_AP"] == pytest.approx(100.0) and json.dumps(split.data) == before
    shared = split.coco().dataset["annotations"]
    assert all(a["segmentation"] is b["segmentation"] for a, b in zip(shared, split.data["annotations"]))


def test_a_box_only_detectors_results_and_soft_masks_cut_at_one_half():
    output = _output([[3, 5, 30, 20]], [3], [SQUARE], scores=[0.1234567])
    box_only = {k: v for k, v in output.items() if k != "masks"}
    assert to_coco_results(box_only, 7, CATEGORIES) == [  # scores to 6 decimals
        {"image_id": 7, "category_id": 3, "bbox": [3.0, 5.0, 27.0, 15.0], "score": 0.123457}]
    soft = 0.3 + 0.4 * SQUARE  # mask probabilities: 0.7 inside the square, 0.3 around it
    [entry] = to_coco_results(_output([[3, 5, 30, 20]], [3], [soft]), 7, CATEGORIES)
    rle = {"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode("ascii")}
    assert np.array_equal(mask_utils.decode(rle), SQUARE)


def test_a_bf16_forwards_masks_are_pasted_in_fp32():
    # under bf16 autocast the mask head's probabilities come in bf16; resampled in bf16 too, the pasted values near
    # the threshold would round to its other side
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(40, 2, generator=generator) * torch.tensor([WIDTH / 2, HEIGHT / 2])
    boxes = torch.cat([corners, corners + torch.tensor([WIDTH / 2, HEIGHT / 2])], dim=1)
    masks = torch.rand(40, 1, 28, 28, generator=generator).to(torch.bfloat16)
    output = {"boxes": boxes, "labels": torch.ones(40, dtype=torch.long), "scores": torch.rand(40, generator=generator)}
    found = to_coco_results({**output, "masks": masks}, 1, CATEGORIES, image_size=(HEIGHT, WIDTH))
    assert found == to_coco_results({**output, "masks": masks.float()}, 1, CATEGORIES, image_size=(HEIGHT, WIDTH))


def test_a_detections_mask_is_ranged_by_its_own_area_and_its_box_by_the_boxs(split):
    """APs/APm/APl, as detectron2 reports them: a false detection whose mask is small (25 px) and box medium
    (1,750 px) counts against the small objects' mask AP, not against their box AP."""
    speck = _box_mask(45, 30, 50, 35)
    false = to_coco_results(_output([[0, 0, 50, 35]], [3], [speck], [0.95]), 7, CATEGORIES)  # above category 3's hit
    metrics = coco_metrics(split.coco(), _perfect() + false)
    assert metrics["mask_APs"] == pytest.approx(100 * (0.5 + 1 + 1) / 3)  # every object is small
    assert metrics["box_APs"] == pytest.approx(100.0)


def test_an_image_the_detector_did_not_see_is_left_out_of_the_scores(split):
    """``image_ids``, the images the detector saw: one it could not read (9 here) is left out of the scores, its
    objects not counted as missed."""
    results = _perfect()[:2]  # image 7's two detections; 11 was seen and holds nothing
    seen = coco_metrics(split.coco(), results, image_ids=[7, 11])
    assert seen["box_AP"] == seen["mask_AP"] == pytest.approx(100.0)
    every = coco_metrics(split.coco(), results)  # image 9's object of category 1 missed: that category's AP is 0
    assert every["box_AP"] == every["mask_AP"] == pytest.approx(100 * 2 / 3)


def test_a_mask_pixel_of_exactly_one_half_is_left_out():
    """A mask is its pixels above 0.5 (`> 0.5`, torchvision's reference evaluation; detectron2 keeps `>= 0.5`):
    docs/dense.md says which."""
    values = np.zeros((HEIGHT, WIDTH), dtype=np.float32)
    values[5:20, 3:30] = 0.5
    values[5:20, 10:20] = np.nextafter(np.float32(0.5), np.float32(1))
    (entry,) = to_coco_results(_output([[3, 5, 30, 20]], [3], [values]), 7, CATEGORIES)
    kept = mask_utils.decode({**entry["segmentation"], "counts": entry["segmentation"]["counts"].encode()})
    assert (kept == _box_mask(10, 5, 20, 20)).all()
