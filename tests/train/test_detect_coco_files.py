"""`lomar detect`'s COCO reader: a broken annotation file is refused in one line naming it, and the file's
boxes are cleaned for training (clipped, zero-area and crowd ones left out) while the split scored stays as written."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from coco_tiny import edited_coco
from PIL import Image

from lomar.cli.app import main
from lomar.data.coco import read_coco, training_split
from lomar.errors import UsageError


def _set(key, value):
    def change(data):
        data[key] = value
    return change


BAD = {  # how the file is broken -> what its one line must say
    "missing key": (lambda d: d.pop("categories"), "no 'categories' key"),
    "image without size": (lambda d: d["images"][0].pop("width"), "images[0] has no 'width'"),
    "duplicate image ids": (lambda d: d["images"][1].update(id=1), "image id 1 appears 2 times"),
    "duplicate annotation ids": (lambda d: d["annotations"][1].update(id=1), "annotation id 1 appears 2 times"),
    "duplicate category ids": (lambda d: d["categories"][1].update(id=3), "category id 3 appears 2 times"),
    "unknown category": (lambda d: d["annotations"][0].update(category_id=99),
                         "category_id 99, which is not in categories"),
    "unknown image": (lambda d: d["annotations"][0].update(image_id=999), "image_id 999, which is not in images"),
    "annotation without segmentation": (lambda d: d["annotations"][0].pop("segmentation"), "has no 'segmentation'"),
    "malformed bbox": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "four finite numbers"),
    "no polygon": (lambda d: d["annotations"][0].update(segmentation=[]), "an empty polygon list"),
    "short polygon": (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), "at least 3 x, y pairs"),
    "flat polygon": (lambda d: d["annotations"][0].update(segmentation=[1, 2, 3, 4, 5, 6]), "at least 3 x, y pairs"),
    "RLE of another size": (lambda d: d["annotations"][0].update(segmentation={"size": [5, 5], "counts": "0"}),
                            "an RLE of size [5, 5], but its image is 96x128"),
    "string image id": (lambda d: [a.update(image_id="a") for a in d["annotations"] if a["image_id"] == 1]
                        and d["images"][0].update(id="a"), "image id 'a' is not an integer"),
    "image listed but missing": (lambda d: d["images"][0].update(file_name="gone.png"),
                                 "not found under"),
    "list image id": (lambda d: d["annotations"][0].update(image_id=[1]), "has image_id [1], not an integer id"),
    "list category id": (lambda d: d["annotations"][0].update(category_id=[3]),
                         "has category_id [3], not an integer id"),
    "empty string id": (lambda d: d["annotations"][1].update(id=""), "annotation id '' is not an integer"),
    "string area": (lambda d: d["annotations"][0].update(area="abc"), "has area 'abc'; an area is a finite number"),
    "infinite width": (lambda d: d["images"][0].update(width=math.inf), "has width inf, height 96"),
    "text width": (lambda d: d["images"][0].update(width="128"), "has width '128', height 96; both must be positive "
                                                                  "numbers (pixels, not text)"),
    "string iscrowd": (lambda d: d["annotations"][0].update(iscrowd="0"), "has iscrowd '0'; it is 0 or 1"),
    "string iscrowd of an empty box": (lambda d: d["annotations"][0].update(bbox=[9, 9, 0, 4], iscrowd="0"),
                                       "has iscrowd '0'; it is 0 or 1"),  # COCOeval scores that box too
    "RLE runs short of its mask": (lambda d: d["annotations"][0].update(segmentation={"size": [96, 128],
                                                                                      "counts": [5, 3]}),
                                   "counts totalling 8 pixels, where its 96x128 mask needs runs totalling 12288"),
    "RLE with a negative run": (lambda d: d["annotations"][0].update(segmentation={"size": [96, 128],
                                                                                   "counts": [-5, 12293]}),
                                "an RLE with malformed counts"),
    "RLE string out of the alphabet": (lambda d: d["annotations"][0].update(segmentation={"size": [96, 128],
                                                                                          "counts": "!!!garbage"}),
                                       "an RLE with malformed counts"),
    "nothing to score": (lambda d: d.update(annotations=[a | {"iscrowd": 1} for a in d["annotations"]]),
                         "no annotation to score (each is a crowd region or of zero area)"),
    "empty split": (_set("images", []), "lists no images"),
    "no categories": (_set("categories", []), "lists no categories"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_coco_file_is_one_line_naming_it(case, tiny, tmp_path, capsys):
    change, expected = BAD[case]
    (_, train_images), (val_ann, val_images) = tiny
    bad = edited_coco(val_ann, tmp_path, change)
    code = main(["detect", "--train-ann", bad, "--train-images", str(train_images), "--val-ann", bad,
                 "--val-images", str(val_images), "--model", "vit_mini_patch16", "--img-size", "64",
                 "--max-steps", "1", "--rois-per-image", "16", "--workers", "0",  # a file let through fails fast
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"lomar detect: error: {bad}: ") and expected in err and "\n" not in err, err


def test_valid_rles_pass_the_run_length_check():
    """pycocotools' own encodings, compressed and not, total their masks' pixels (the check reads the string as
    pycocotools reads it: sign-extended, runs after the second as differences)."""
    from pycocotools import mask as coco_mask

    from lomar.data.coco_values import segmentation_error

    rng = torch.Generator().manual_seed(0)
    for height, width, density in ((96, 128, 0.5), (7, 5, 0.1), (40, 33, 0.9), (3, 3, 0.0), (2, 4, 1.0)):
        mask = (torch.rand(height, width, generator=rng) < density).numpy().astype("uint8")
        encoded = coco_mask.encode(mask.copy(order="F"))
        rle = {"size": [height, width], "counts": encoded["counts"].decode()}
        assert segmentation_error(rle, width, height) is None, rle
        flat = mask.flatten(order="F")  # uncompressed counts: runs of 0, 1, 0, ... in column-major order
        runs = [0] * int(flat[0]) + [len(list(run)) for _, run in itertools.groupby(flat)]
        assert sum(runs) == height * width
        assert segmentation_error({"size": [height, width], "counts": runs}, width, height) is None
        assert (coco_mask.decode(coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width))
                == mask).all()


def test_boxes_clipped_zero_area_skipped_crowd_kept_for_evaluation_only(tiny, tmp_path):
    (ann, images), _ = tiny
    data = json.loads(ann.read_text())
    anns = data["annotations"]
    anns[0]["bbox"] = [-10.0, -5.0, 40.0, 30.0]  # reaches outside: clipped to [0, 0, 30, 25]
    anns[1]["bbox"] = [20.0, 20.0, 0.0, 10.0]  # no area: skipped
    anns[2]["iscrowd"] = 1
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    split = read_coco(path, images)
    s = split.summary
    assert (s.clipped, s.zero_area, s.crowd, s.boxes) == (1, 1, 1, len(anns) - 2)
    assert split.data["annotations"][0]["bbox"] == [0.0, 0.0, 30.0, 25.0]
    assert any(a["iscrowd"] for a in split.data["annotations"])  # pycocotools ignores detections on it
    train = training_split(split)
    assert not any(a["iscrowd"] for a in train.data["annotations"])
    assert all(a["id"] != anns[1]["id"] for a in train.data["annotations"])
    everything_crowd = {**split.data, "annotations": [{**a, "iscrowd": 1} for a in split.data["annotations"]]}
    with pytest.raises(UsageError, match="no image with a usable box"):
        training_split(type(split)(split.path, split.root, everything_crowd, split.categories))


def test_training_says_the_images_without_a_box_it_leaves_out(tiny, tmp_path):
    """An image of no annotation (or only crowd ones) is not trained on: the train line's count says so, where the
    run's image count fell short of the file's without a word."""
    (ann, images), _ = tiny
    data = json.loads(ann.read_text())
    last = data["images"][-1]["id"]
    data["annotations"] = [a if a["image_id"] != last else {**a, "iscrowd": 1} for a in data["annotations"]]
    path = tmp_path / "one_crowded.json"
    path.write_text(json.dumps(data))
    split = read_coco(path, images)
    train = training_split(split)
    assert len(train.data["images"]) == len(data["images"]) - 1 and train.summary.boxless == 1
    assert train.summary.line().endswith(", 1 images without a box left out of training")
    assert split.summary.boxless == 0 and "without a box" not in split.summary.line()  # the file as read: all kept


def test_evaluation_does_not_change_the_split_it_scores(tiny):
    (ann, images), _ = tiny
    split = read_coco(ann, images)
    before = json.dumps(split.data)
    coco = split.coco()
    coco.dataset["annotations"][0]["segmentation"] = {"size": [1, 1], "counts": "1"}  # as COCOeval's toRle does
    assert json.dumps(split.data) == before


def test_a_validation_folder_of_other_images_is_refused_before_training(tiny, tmp_path, capsys):
    # --val-images at half-size copies: each was skipped at the first evaluation, after an epoch of training, and
    # the run went on unscored ("no metric defined"), exit 0
    (train_ann, train_images), (val_ann, val_images) = tiny
    (small := tmp_path / "small").mkdir()
    for path in sorted(val_images.iterdir()):
        with Image.open(path) as image:
            image.resize((image.width // 2, image.height // 2)).save(small / path.name)
    out = tmp_path / "run"
    assert main(["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann",
                 str(val_ann), "--val-images", str(small), "--model", "vit_mini_patch16", "--img-size", "64",
                 "--batch-size", "2", "--max-steps", "1", "--warmup-steps", "1", "--rois-per-image", "16",
                 "--workers", "0", "--threads", "1", "--device", "cpu", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"lomar detect: error: 3 of the 3 images {val_ann} lists (over 10%) cannot be used, e.g. "
                           f"{small / 'img000.png'} is 64x48 upright, but {val_ann} gives it 128x96")
    assert last.endswith("pass the folder of the images it was written for as --val-images, or fix the file")
    assert not out.exists()


def test_the_validation_line_says_its_boxes_are_scored_as_written(tiny, tmp_path, capsys):
    # training's line says its boxes are clipped to their image and those of zero area skipped; COCOeval scores the
    # validation split's as the file writes them: a zero-area box stays an object no detected box matches
    (_, train_images), (val_ann, val_images) = tiny
    edited = edited_coco(val_ann, tmp_path, lambda d: d["annotations"][0].update(bbox=[-10.0, -5.0, 40.0, 30.0])
                         or d["annotations"][1].update(bbox=[20.0, 20.0, 0.0, 10.0]))
    (small := tmp_path / "small").mkdir()  # refused at the images' check, after the line, before any model
    for path in sorted(val_images.iterdir()):
        with Image.open(path) as image:
            image.resize((image.width // 2, image.height // 2)).save(small / path.name)
    main(["detect", "--train-ann", str(edited), "--train-images", str(train_images), "--val-ann", str(edited),
          "--val-images", str(small), "--model", "vit_mini_patch16", "--img-size", "64", "--workers", "0",
          "--out", str(tmp_path / "run")])
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith(f"lomar detect: val {edited}: "))
    assert "1 boxes reaching outside their image (scored as written)" in line
    assert "1 boxes of zero area (scored as written: no detected box matches one" in line
    assert "skipped" not in line and "clipped" not in line
