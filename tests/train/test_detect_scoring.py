"""`lomar detect`'s score: an end-to-end run whose predictions.json holds the detector's own detections and
pycocotools re-scores to the AP lomar reported (and --eval-only detects and scores alike), COCOeval on the annotation
file as written, and a score over part of the validation split (an unreadable image left out, not counted as missed)
that says so."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from coco_tiny import write_tiny_coco

from lomar.cli.app import main
from lomar.data.coco import collate_detection, detection_dataset, read_coco
from lomar.data.jitter import eval_transforms
from lomar.train.detect import DetectTask
from lomar.train.task import TrainingError


def _rescore(ann_file, predictions: list[dict]) -> dict[str, float | None]:
    """pycocotools alone, as detectron2 scores: boxes from bbox, masks with bbox dropped."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        for prefix, kind, drop in (("box", "bbox", "segmentation"), ("mask", "segm", "bbox")):
            evaluator = COCOeval(gt, gt.loadRes([{k: v for k, v in p.items() if k != drop} for p in predictions]), kind)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            out.update({f"{prefix}_{n}": (v * 100 if v >= 0 else None) for n, v in zip(names, evaluator.stats)})
    return out


def _recorded_detections(monkeypatch) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The (image, output) of every image a ViTMaskRCNN evaluates from here on, each output's masks pasted at the
    image's size: the detector's own detections, as its forward returns them."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from lomar.models.mask_rcnn import ViTMaskRCNN

    recorded, own = [], ViTMaskRCNN.forward

    def forward(self, images, targets=None):
        outputs = own(self, images, targets)
        if not self.training:
            for image, output in zip(images, outputs):
                output = {k: v.detach().clone() for k, v in output.items()}
                if not self.transform.paste_masks:  # the mask head's (N, 1, 28, 28) over the boxes: torchvision's paste
                    output["masks"] = paste_masks_in_image(output["masks"], output["boxes"], tuple(image.shape[-2:]))
                recorded.append((image.clone(), output))
        return outputs

    monkeypatch.setattr(ViTMaskRCNN, "forward", forward)
    return recorded


def _assert_written_as_detected(predictions: list[dict], detections: list, ann: Path, images: Path) -> None:
    """``predictions`` are, in COCO's terms, the ``detections`` (:func:`_recorded_detections`) of each image of the
    split (``ann``, ``images``), told apart by its pixels: as many per image, in their order, each with the category
    id of its label (label k: the k-th smallest id), its xyxy box as [x, y, w, h], its score and its mask cut at 0.5.
    What a rescoring cannot tell apart where the AP of a detector two steps trained is about 0 whatever it finds."""
    from pycocotools import mask as mask_utils

    from lomar.data.decode import load_image

    split = json.loads(ann.read_text())
    ids = sorted(c["id"] for c in split["categories"])
    written: dict[int, list[dict]] = {}
    for p in predictions:
        written.setdefault(p["image_id"], []).append(p)
    assert sorted(written) == sorted(image["id"] for image in split["images"]) and len(detections) == len(written)
    masks = []
    for image in split["images"]:
        pixels = eval_transforms()(load_image(images / image["file_name"]))
        [output] = [output for seen, output in detections if torch.equal(seen, pixels)]
        got, boxes = written[image["id"]], output["boxes"]
        assert len(got) == len(boxes), (image["id"], len(got), len(boxes))
        assert [p["category_id"] for p in got] == [ids[label - 1] for label in output["labels"].tolist()]
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        assert torch.allclose(torch.tensor([p["bbox"] for p in got]), xywh, rtol=0, atol=1e-3), image["id"]
        assert torch.allclose(torch.tensor([p["score"] for p in got]), output["scores"], rtol=0, atol=1e-6)
        rles = mask_utils.decode([p["segmentation"] for p in got]).transpose(2, 0, 1)
        assert (rles == (output["masks"][:, 0] > 0.5).numpy()).all(), image["id"]
        masks.append({m.tobytes() for m in rles})
    # masks that tell detections and images apart: one of another detection's, or another image's, is seen
    assert all(len(m) > 10 for m in masks) and all(a != b for a, b in zip(masks, masks[1:])), [len(m) for m in masks]


@pytest.mark.slow
def test_detect_trains_and_predictions_rescore_to_the_reported_ap(tiny, tmp_path, capsys, monkeypatch,
                                                                  eval_proposals):
    (train_ann, train_images), (val_ann, val_images) = tiny
    # evaluations at 200 region proposals an image, not 1000: still 100 detections on each of the 3 images (the
    # detector's cap, which the scoring and the written predictions must cut alike), 88-93 at 100 proposals
    eval_proposals(200)
    detections = _recorded_detections(monkeypatch)
    out = tmp_path / "run"
    data = ["--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann", str(val_ann),
            "--val-images", str(val_images)]
    code = main(["detect", *data, "--model", "vit_tiny_patch16", "--img-size", "96", "--batch-size", "2",
                 "--max-steps", "2", "--warmup-steps", "1", "--rois-per-image", "32",
                 "--workers", "0", "--threads", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "randomly initialised" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # Mask R-CNN's five losses, each logged, and the loss their sum
        parts = [r[name] for name in DetectTask.loss_parts]
        assert len(parts) == 5 and all(math.isfinite(v) and v >= 0 for v in parts), r
        assert math.isclose(sum(parts), r["loss"], rel_tol=1e-5), r
    scored = [r for r in records if "box_AP" in r]
    assert scored and scored[-1]["step"] == 2
    metrics = scored[-1]
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(predictions[0])
    assert {p["category_id"] for p in predictions} <= {3, 7}
    _assert_written_as_detected(predictions, detections, val_ann, val_images)
    rescored = _rescore(val_ann, predictions)
    for key, value in rescored.items():
        assert (metrics[key] is None) == (value is None), key
        assert value is None or math.isclose(metrics[key], value, abs_tol=1e-9), (key, metrics[key], value)

    # --eval-only on the finished run scores the same detector the same way
    (out / "predictions.json").rename(tmp_path / "first.json")
    evaluated = tmp_path / "evaluated"
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(f) or load(f, *a, **k))
    code = main(["detect", "--val-ann", str(val_ann), "--val-images", str(val_images), "--eval-only",  # the run's
                 "--pretrained", str(out / "last.pt"), "--workers", "0", "--threads", "2", "--out", str(evaluated)])
    assert code == 0
    assert reads == [out / "last.pt"]  # read once: the settings taken and the weights scored are of one read
    monkeypatch.undo()
    assert "96 px input" in capsys.readouterr().err  # the detector's own size, not the 1024 default
    again = json.loads((evaluated / "metrics.jsonl").read_text().splitlines()[-1])
    # the detections of the saved detector are the run's, to the last digit and mask pixel
    assert json.loads((evaluated / "predictions.json").read_text()) == predictions
    assert {k: again[k] for k in rescored} == {k: metrics[k] for k in rescored} and again["img_size"] == 96
    # which file of the run was scored, and at which step (a run folder gives its best.pt, else last.pt)
    assert again["checkpoint"] == str(out / "last.pt") and again["step"] == 2
    # the predictions written are not replaced by another scoring unless asked to
    code = main(["detect", "--val-ann", str(val_ann), "--val-images", str(val_images), "--eval-only",
                 "--pretrained", str(out / "last.pt"), "--workers", "0", "--out", str(evaluated)])
    assert code == 2 and "already holds a predictions.json" in capsys.readouterr().err


class _Oracle(torch.nn.Module):
    """A perfect detector: each call answers with the non-crowd ``annotations`` (default: the ground truth scored)
    of the next images in ``ids``, their masks at the image's size, which ``oracle_masks`` has pasted as they are."""

    def __init__(self, split, ids, annotations=None):
        super().__init__()
        self.transform = SimpleNamespace(paste_masks=True)  # what unpasted_masks switches off
        self.coco, self.ids, self.label_of = split.coco(), list(ids), {c: i + 1 for i, c in enumerate(split.categories)}
        self.annotations = self.coco.dataset["annotations"] if annotations is None else annotations

    def forward(self, images):
        outputs = []
        for _ in images:
            image_id = self.ids.pop(0)
            anns = [a for a in self.annotations if a["image_id"] == image_id and not a["iscrowd"]]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
            masks = torch.stack([torch.from_numpy(self.coco.annToMask(a)).float() for a in anns])[:, None]
            outputs.append({"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns]),
                            "scores": torch.ones(len(anns)), "masks": masks})
        return outputs


@pytest.fixture(scope="module")
def ten_val(tmp_path_factory):
    """A validation split of 10 images, the first cut short (skipped with a warning when read): 10 %, as many as a
    score may leave out."""
    ann, images = write_tiny_coco(tmp_path_factory.mktemp("coco") / "val", 10, seed=1)
    first = sorted(images.glob("*.png"))[0]
    first.write_bytes(first.read_bytes()[:200])
    return read_coco(ann, images)


@pytest.fixture
def oracle_masks(monkeypatch):
    """torchvision's mask pasting, which detect's evaluation runs on each detection's mask, leaving the masks as they
    are: an :class:`_Oracle`'s are the annotations' own, at the image's size."""
    from torchvision.models.detection import roi_heads

    monkeypatch.setattr(roi_heads, "paste_masks_in_image", lambda masks, boxes, size: masks)


def test_a_validation_image_that_cannot_be_read_is_left_out_of_the_ap_not_counted_as_missed(ten_val, oracle_masks):
    split = ten_val
    metrics, task = _evaluated(split, _Oracle(split, [image["id"] for image in split.data["images"][1:]]))
    assert metrics["box_AP"] == pytest.approx(100.0) and metrics["mask_AP"] == pytest.approx(100.0)
    assert {r["image_id"] for r in task.predictions} == {image["id"] for image in split.data["images"][1:]}
    assert metrics["val_images"] == {"scored": 9, "skipped": 1}  # the record says the score is over part of the split


def test_a_score_over_part_of_the_validation_split_says_so(ten_val, tmp_path, capsys, monkeypatch, oracle_masks):
    """--eval-only's record and result line, and before every epoch line of a run, the images scored and skipped
    (each skipped one is warned of only at its first read); more than 10 % skipped stops in one line."""
    from lomar.train import detect

    split, ids = ten_val, [image["id"] for image in ten_val.data["images"][1:]]
    note = f"{split.root}: 1 unreadable image(s) skipped, at most 10% of a split"
    monkeypatch.setattr(detect, "DetectTask", lambda *args: _evaluated(split, _Oracle(split, ids), score=False)[1])
    config = SimpleNamespace(out=str(tmp_path / "ev"), pretrained="detector.pt", img_size=64, seed=0, device="cpu",
                             threads=torch.get_num_threads())  # --eval-only sets it: keep this process's
    assert detect.evaluate_only(config) == 0
    record = json.loads((tmp_path / "ev" / "metrics.jsonl").read_text())
    assert record["val_images"] == {"scored": 9, "skipped": 1} and record["box_AP"] == pytest.approx(100.0)
    assert capsys.readouterr().out.splitlines()[-1] == (f"lomar detect: box_AP 100.00%, mask_AP 100.00% over 9 images "
                                                        f"({note}); {tmp_path / 'ev' / 'predictions.json'}")
    _, task = _evaluated(split, _Oracle(split, ids * 2), score=False, run=tmp_path)
    for _ in range(2):  # a run's evaluations: each says it, the epoch line following
        assert task.evaluate()["val_images"] == {"scored": 9, "skipped": 1}
        assert capsys.readouterr().out == note + "\n"
    three = read_coco(*write_tiny_coco(tmp_path / "three", 3, seed=1))
    first = three.root / three.data["images"][0]["file_name"]
    first.write_bytes(first.read_bytes()[:200])
    with pytest.raises(TrainingError, match=rf"^{re.escape(str(three.root))}: 1 of 3 images \(over 10%\) could not be "
                                         rf"used, e\.g\. cannot decode image {re.escape(str(first))}: .*; fix or "
                                         rf"remove them$"):
        _evaluated(three, _Oracle(three, [2, 3]))


def _evaluated(split, model, score: bool = True, run: Path | None = None) -> tuple[dict | None, DetectTask]:
    """(metrics, task) of DetectTask's evaluation alone (``score`` False: not yet made, None), of ``split`` by
    ``model``, in this process; ``run``: the folder of a training run whose evaluation it is (its predictions.json
    written there), None for --eval-only's."""
    from torch.utils.data import DataLoader

    from lomar.train.distributed import DistInfo

    task = DetectTask.__new__(DetectTask)
    task.val, task.categories, task.info, task.device = split, split.categories, DistInfo(), torch.device("cpu")
    task.val_loader = DataLoader(detection_dataset(split, eval_transforms(), train=False), 2,
                                 collate_fn=collate_detection)
    task.model, task.train_loader, task.source = model, [] if run else None, {}
    task.config = SimpleNamespace(eval_only=run is None, out=str(run))
    return task.evaluate() if score else None, task


def test_the_ap_is_cocoevals_on_the_file_as_written_not_on_the_boxes_clipped_for_training(tiny, tmp_path,
                                                                                          oracle_masks):
    """Training clips a box to its image and leaves out one of zero area; the AP is scored, as detectron2 and papers
    score it, by COCOeval on the file itself: a detector that finds every object inside its image misses the box
    reaching outside it at the higher IoUs, and the object of zero area (its mask is not empty) altogether."""
    _, (ann, images) = tiny
    data = json.loads(ann.read_text())
    outside, empty = data["annotations"][0], data["annotations"][-1]
    assert outside["image_id"] != empty["image_id"]
    width = next(image["width"] for image in data["images"] if image["id"] == outside["image_id"])
    outside["bbox"][2] = (width - outside["bbox"][0]) * 1.5  # a third outside: IoU 2/3 with the clipped box
    empty["bbox"][3] = 0.0
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(data))
    split = read_coco(path, images)
    assert (split.summary.clipped, split.summary.zero_area) == (1, 1)
    ids = [image["id"] for image in split.data["images"]]
    metrics, task = _evaluated(split, _Oracle(split, ids, split.data["annotations"]))  # the targets trained on
    by_hand = _rescore(path, task.predictions)
    assert metrics.keys() == by_hand.keys()
    for key, value in by_hand.items():
        assert (metrics[key] is None) == (value is None), key
        assert value is None or math.isclose(metrics[key], value), (key, metrics[key], value)  # the targets: 100
    assert by_hand["box_AP"] < 95 and by_hand["mask_AP"] < 95


class _Killed(BaseException):
    """A SIGKILL's stand-in: nothing after it runs, no handler catches it."""


def test_an_eval_only_killed_before_its_predictions_are_written_logs_no_record(ten_val, tmp_path, monkeypatch,
                                                                                  oracle_masks):
    # the record is the scoring's last write: one left without its predictions.json, the rerun would log again
    from lomar.train import detect

    def killed(path, text):
        raise _Killed

    split, ids = ten_val, [image["id"] for image in ten_val.data["images"][1:]]
    monkeypatch.setattr(detect, "DetectTask", lambda *args: _evaluated(split, _Oracle(split, ids), score=False)[1])
    monkeypatch.setattr(detect, "atomic_write_text", killed)
    config = SimpleNamespace(out=str(tmp_path / "ev"), pretrained="detector.pt", img_size=64, seed=0, device="cpu",
                             threads=torch.get_num_threads())
    with pytest.raises(_Killed):
        detect.evaluate_only(config)
    assert not (tmp_path / "ev" / "metrics.jsonl").exists()


def test_a_runs_evaluation_writes_its_predictions_before_the_checkpoint_that_follows(ten_val, tmp_path,
                                                                                     oracle_masks):
    # the end's evaluation comes after the run's last checkpoint: written there, by the end's finish, a kill between
    # left them missing for good, a resume finding the step scored (the log says so) with nothing to evaluate again
    split, ids = ten_val, [image["id"] for image in ten_val.data["images"][1:]]
    _, task = _evaluated(split, _Oracle(split, ids), score=False, run=tmp_path)
    task.evaluate()
    assert task.predictions and json.loads((tmp_path / "predictions.json").read_text()) == task.predictions
