"""`lomar detect`'s evaluation (a run's, and --eval-only's) pastes its masks a few at a time
(:func:`lomar.models.mask_rcnn.unpasted_masks`, :data:`lomar.eval.coco.PASTE_PIXELS`) into the RLEs, and so the box
and mask AP, of torchvision's own evaluation, which pastes every detection's mask at the image's size at once."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import CPU_RUN, counted_mask_pastes
from lomar.cli.app import main


@pytest.mark.slow  # trains a detector and a segmenter
def test_detects_evaluation_pastes_a_few_masks_at_a_time_into_torchvisions_rles_and_scores(tmp_path, monkeypatch,
                                                                                         dense_runs, eval_proposals):
    from pycocotools.coco import COCO

    from lomar.data.decode import load_image
    from lomar.data.jitter import eval_transforms
    from lomar.eval import coco
    from lomar.eval.predict import load_trained

    data, _, run, _ = dense_runs
    # 300 proposals an image give this detector's 1000's 200 detections and scores (at 100 its box AP is 0, and the
    # last assertion fails); the box head on 1000, run twice, is ~40 % of the test's call on a 2-core CPU
    eval_proposals(300)
    ann, images = data / "annotations" / "instances_val.json", data / "images" / "val"
    split = json.loads(ann.read_text())
    trained = load_trained(run)
    expected = []
    with torch.no_grad():  # torchvision's evaluation: each image's masks pasted at once
        for image in split["images"]:
            output = trained.model([eval_transforms()(load_image(str(images / image["file_name"])))])[0]
            expected.extend(coco.to_coco_results(output, image["id"], trained.checkpoint["categories"]))
    expected_metrics = coco.coco_metrics(COCO(str(ann)), expected)

    pasted = counted_mask_pastes(monkeypatch)
    monkeypatch.setattr(coco, "PASTE_PIXELS", 3 * 64 * 64)  # compose-digits' 64 px images: 3 masks a paste
    assert main(["detect", "--eval-only", "--pretrained", str(run), "--val-ann", str(ann), "--val-images", str(images),
                 "--batch-size", "2", "--out", str(tmp_path / "scored"), *CPU_RUN]) == 0

    scored = json.loads((tmp_path / "scored" / "predictions.json").read_text())
    assert len(split["images"]) == 2 and len(expected) > 20
    assert len({json.dumps(r["segmentation"]) for r in expected}) > 10  # masks that differ: their pasting counts
    assert scored == json.loads(json.dumps(expected))  # the same RLEs, byte for byte, in the same order
    assert max(pasted) == 3 and sum(pasted) == len(expected)
    record = json.loads((tmp_path / "scored" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k: record[k] for k in expected_metrics} == expected_metrics
    assert any(value for value in expected_metrics.values())  # scores to compare, not all 0 or undefined
