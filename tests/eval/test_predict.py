"""`lomar predict` (lomar.eval.predict): a trained model's answers on image files are the ones its command's own
--eval-only computes for the same image: a classifier's logits (its evaluation transform, size and precision), a
detector's COCO results, a segmenter's label-map PNG; an image turned by its EXIF orientation is read upright, as
training reads it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CPU_RUN, counted_mask_pastes
from lomar.cli.app import main
from lomar.models.vit import VisionTransformer
from lomar.train.segment_pngs import WRITTEN


@pytest.fixture
def logits_of(monkeypatch):
    """Every classifier forward's logits from here on, in call order (a list, emptied by the caller)."""
    seen, forward = [], VisionTransformer.forward
    monkeypatch.setattr(VisionTransformer, "forward", lambda self, x: seen.append(forward(self, x)) or seen[-1])
    return seen


def test_a_classifiers_predictions_are_its_eval_only_logits(tmp_path, classifier, labelled_folder, logits_of):
    val = labelled_folder / "val"
    assert main(["finetune", "--eval-only", "--pretrained", str(classifier), "--val", str(val), "--batch-size", "3",
                 "--out", str(tmp_path / "scored"), *CPU_RUN]) == 0
    scored = torch.cat(logits_of)
    logits_of.clear()
    assert main(["predict", str(classifier), str(val), "--out", str(tmp_path / "out"), "--batch-size", "3",
                 *CPU_RUN]) == 0
    assert torch.equal(torch.cat(logits_of), scored)  # same images, same order: val's class folders, sorted
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [row["path"] for row in rows] == [str(path) for path in sorted(val.rglob("*.png"))]
    probabilities = scored.softmax(1)
    for row, p in zip(rows, probabilities, strict=True):
        order = p.argsort(descending=True).tolist()  # two classes: --top-k 5 gives both
        assert [entry["class"] for entry in row["top_k"]] == [["a", "b"][i] for i in order]
        assert [entry["probability"] for entry in row["top_k"]] == [round(float(p[i]), 6) for i in order]


def test_top_k_and_a_checkpoint_without_class_names(tmp_path, classifier, labelled_folder):
    from lomar.checkpoints.io import atomic_save, safe_load

    ckpt = safe_load(classifier / "best.pt")
    del ckpt["classes"]
    atomic_save(ckpt, tmp_path / "nameless.pt")
    image = next((labelled_folder / "val").rglob("*.png"))
    assert main(["predict", str(tmp_path / "nameless.pt"), str(image), "--out", str(tmp_path), "--top-k", "1",
                 *CPU_RUN]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(row["top_k"]) == 1 and row["top_k"][0]["class"] in (0, 1)  # the head's row, where no name was kept


def _turned(folder, pixels: np.ndarray) -> tuple:
    """``pixels`` saved upright, and stored turned a quarter with EXIF orientation 6 (rotate 90 degrees clockwise to
    view), as a camera saves a portrait photo; both lossless PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(pixels, 1))).save(folder / "turned.png", exif=exif)
    Image.fromarray(np.ascontiguousarray(np.rot90(pixels, 1))).save(folder / "stored.png")  # its EXIF ignored
    return folder / "upright.png", folder / "turned.png", folder / "stored.png"


def test_an_exif_turned_photo_is_classified_upright(tmp_path, classifier, logits_of):
    pixels = (np.random.RandomState(3).rand(48, 36, 3) * 255).astype(np.uint8)
    upright, turned, stored = _turned(tmp_path / "photos", pixels)
    for image in (upright, turned, stored):
        assert main(["predict", str(classifier), str(image), "--out", str(tmp_path / image.stem), *CPU_RUN]) == 0
    assert torch.equal(logits_of[0], logits_of[1]) and not torch.equal(logits_of[0], logits_of[2])


# ---- detector and segmenter: trained on compose-digits (conftest's dense_runs) ---------------------------------------
def _order(result: dict) -> tuple:
    return result["image_id"], -result["score"], result["bbox"]


@pytest.mark.slow  # trains a detector and a segmenter
def test_a_detectors_predictions_are_its_eval_only_ones(tmp_path, monkeypatch, dense_runs):
    from torchvision.models.detection.rpn import RegionProposalNetwork

    # both commands keep 50 region proposals an image, not 1000: the same box and mask heads run in each, on fewer
    own = RegionProposalNetwork.post_nms_top_n
    monkeypatch.setattr(RegionProposalNetwork, "post_nms_top_n", lambda self: own(self) if self.training else 50)
    data, _, run, _ = dense_runs
    ann, images = data / "annotations" / "instances_val.json", data / "images" / "val"
    assert main(["detect", "--eval-only", "--pretrained", str(run), "--val-ann", str(ann), "--val-images", str(images),
                 "--batch-size", "2", "--out", str(tmp_path / "scored"), *CPU_RUN]) == 0
    # predict's default precision (auto) is detect's evaluation's, fp32, whatever the run trained in
    assert main(["predict", str(run), str(images), "--out", str(tmp_path / "out"), "--batch-size", "2", *CPU_RUN]) == 0
    split = json.loads(ann.read_text())
    files = {image["id"]: str(images / image["file_name"]) for image in split["images"]}
    names = {c["id"]: c["name"] for c in split["categories"]}
    scored = json.loads((tmp_path / "scored" / "predictions.json").read_text())
    predicted = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert scored and "segmentation" in scored[0]  # masks as RLE, boxes in the image's pixels
    expected = sorted(({**r, "image_id": files[r["image_id"]], "category_name": names[r["category_id"]]}
                       for r in scored), key=_order)
    assert sorted(predicted, key=_order) == expected
    image = expected[0]["image_id"]  # --score-threshold at the median of its scores, on it alone
    scores = sorted(r["score"] for r in predicted if r["image_id"] == image)
    threshold = scores[len(scores) // 2]
    assert main(["predict", str(run), image, "--out", str(tmp_path / "kept"), "--score-threshold", str(threshold),
                 *CPU_RUN]) == 0
    kept = json.loads((tmp_path / "kept" / "predictions.json").read_text())
    assert sorted(r["score"] for r in kept) == [score for score in scores if score >= threshold]


def _widened(data, root):
    """``data``'s validation split (ADE20K layout) with each photo and annotation beside its mirror image: 64 x 128,
    where compose-digits' 64 px squares are one window of the segmenter's 64 px crop whatever the mode and stride."""
    for kind in ("images", "annotations"):
        (root / kind / "validation").mkdir(parents=True)
        for path in (data / kind / "validation").iterdir():
            pixels = np.asarray(Image.open(path))
            Image.fromarray(np.concatenate([pixels, pixels[:, ::-1]], axis=1)).save(
                root / kind / "validation" / f"{path.stem}.png")
    return root


@pytest.mark.slow  # trains a detector and a segmenter
@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_a_segmenters_label_maps_are_its_eval_only_pngs(tmp_path, dense_runs, mode):
    data, _, _, run = dense_runs
    data = _widened(data, tmp_path / "wide")  # three windows at the run's stride: mode and stride change the maps
    # the run's mode (slide) by default; another given as to --eval-only
    given = [] if mode == "slide" else ["--eval-mode", mode]
    assert main(["segment", "--eval-only", "--pretrained", str(run), "--data", str(data), "--out",
                 str(tmp_path / "scored"), *given, *CPU_RUN]) == 0
    assert main(["predict", str(run), str(data / "images" / "validation"), "--out", str(tmp_path / "out"), *given,
                 *CPU_RUN]) == 0  # predict's auto is segment's evaluation's precision, fp32
    scored = sorted((tmp_path / "scored" / "predictions").iterdir())  # the PNGs, and the list of them, of each
    assert WRITTEN in [p.name for p in scored]
    assert [p.name for p in scored] == sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != ".lock")
    for path in scored:
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes()


@pytest.mark.slow  # trains a detector and a segmenter
def test_an_exif_turned_photo_is_segmented_upright_at_its_size(tmp_path, dense_runs):
    data, _, _, run = dense_runs
    photo = np.asarray(Image.open(next((data / "images" / "validation").iterdir())).convert("RGB"))
    pixels = np.ascontiguousarray(np.concatenate([photo, photo[:16]], axis=0))  # 80 x 64: not square
    upright, turned, _ = _turned(tmp_path / "photos", pixels)
    assert main(["predict", str(run), str(upright), str(turned), "--out", str(tmp_path / "out"), *CPU_RUN]) == 0
    maps = [Image.open(tmp_path / "out" / name) for name in ("upright.png", "turned.png")]
    assert maps[0].size == maps[1].size == (64, 80)  # (width, height): the upright photo's
    assert np.array_equal(np.asarray(maps[0]), np.asarray(maps[1]))


@pytest.fixture(scope="module")
def detector():
    """A detector of three categories as initialised: 20 detections an image, each with a mask."""
    from lomar.eval.predict import Trained
    from lomar.models.mask_rcnn import ViTMaskRCNN
    from lomar.models.vit_config import ViTConfig

    torch.manual_seed(0)
    model = ViTMaskRCNN(VisionTransformer(ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2)),
                        3, 64, detections_per_image=20)
    return Trained("detector", model.eval(), None, {"categories": [1, 2, 5]})


def _photos(folder, sizes) -> list:
    from lomar.eval.predict import ListedImage

    folder.mkdir()
    rng, listed = np.random.default_rng(0), []
    for i, (height, width) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(folder / f"{i}.png")
        listed.append(ListedImage(str(folder / f"{i}.png"), str(i)))
    return listed


def test_a_detectors_masks_are_pasted_a_few_at_a_time_into_the_rles_of_all_at_once(tmp_path, monkeypatch, detector):
    # torchvision's evaluation pastes every detection's mask at the image's size at once, and keeps a second copy:
    # 2 x 100 x 12 M floats (9.6 GB) for one phone photo
    from lomar.data.decode import load_image
    from lomar.data.jitter import eval_transforms
    from lomar.eval import coco, predict

    (photo,) = _photos(tmp_path / "photos", [(90, 130)])  # larger than the 64 px input: resized and mapped back
    with torch.no_grad():  # as predict runs: a forward recording gradients differs in the last bits
        output = detector.model([eval_transforms()(load_image(photo.path))])[0]  # torchvision's own pasting
    expected = coco.to_coco_results(output, photo.path, [1, 2, 5])
    pasted = counted_mask_pastes(monkeypatch)
    monkeypatch.setattr(coco, "PASTE_PIXELS", 3 * 90 * 130 + 1)
    found = predict.detect(detector, [photo], torch.device("cpu"), 0.0, 16, 0, [])
    assert len(expected) == 20 and len({json.dumps(entry["segmentation"]) for entry in expected}) > 10
    assert found == expected
    assert pasted == [3] * 6 + [2]
    assert detector.model.transform.paste_masks  # as it was: the model is left pasting


def test_a_detectors_batch_holds_batch_size_images_and_batch_pixels_at_most(tmp_path, monkeypatch, detector):
    # a batch of sixteen 12 MP phone photos decoded as float is 2.3 GB before the model resizes them
    from lomar.eval import predict

    photos = _photos(tmp_path / "photos", [(40, 50), (40, 50), (30, 20), (40, 50), (100, 100), (10, 10)])
    batches, nothing = [], {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                            "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 28, 28)}
    monkeypatch.setattr(detector.model, "forward",  # the batches' sizes are the point, not the detections
                        lambda images: batches.append([tuple(i.shape[-2:]) for i in images]) or [nothing] * len(images))
    monkeypatch.setattr(predict, "BATCH_PIXELS", 4500)
    predict.detect(detector, photos, torch.device("cpu"), 0.0, 16, 0, [])
    assert batches == [[(40, 50), (40, 50)], [(30, 20), (40, 50)], [(100, 100)], [(10, 10)]]
    batches.clear()
    predict.detect(detector, photos, torch.device("cpu"), 0.0, 3, 0, [])
    assert [len(batch) for batch in batches] == [2, 2, 1, 1]
    monkeypatch.setattr(predict, "BATCH_PIXELS", 10**6)
    batches.clear()
    predict.detect(detector, photos, torch.device("cpu"), 0.0, 4, 0, [])
    assert [len(batch) for batch in batches] == [4, 2]
