"""A category with boxes in the validation split but none in the training split is never trained on and scores 0 AP
in the mean: `lomar detect` warns of it once at start-up, naming it."""

from __future__ import annotations

import pytest
from coco_tiny import edited_coco

from lomar.cli.app import main
from lomar.data.coco import CocoSplit, CocoSummary
from lomar.train import detect


class _Built(Exception):
    """What stops the run once its splits are read, before its datasets."""


def _started(tiny, tmp_path, monkeypatch, capsys, change) -> str:
    """What `lomar detect` says before its datasets, its training file edited by ``change``."""
    (train_ann, train_images), (val_ann, val_images) = tiny
    train = edited_coco(train_ann, tmp_path, change)

    def built(*args, **kwargs):
        raise _Built

    monkeypatch.setattr(detect, "detection_dataset", built)
    with pytest.raises(_Built):
        main(["detect", "--train-ann", train, "--train-images", str(train_images), "--val-ann", str(val_ann),
              "--val-images", str(val_images), "--model", "vit_mini_patch16", "--img-size", "64", "--device", "cpu",
              "--workers", "0", "--out", str(tmp_path / "run")])
    return capsys.readouterr().err


def test_a_category_boxed_only_in_validation_is_warned_of_once(tiny, tmp_path, monkeypatch, capsys):
    def no_discs(data):  # category 7, 'disc': crowd regions alone in training, which trains no box of them
        for ann in data["annotations"]:
            ann["iscrowd"] = int(ann["category_id"] == 7)

    err = _started(tiny, tmp_path, monkeypatch, capsys, no_discs)
    warned = [line for line in err.splitlines() if "warning" in line]
    train = tmp_path / "bad.json"
    assert warned == [f"lomar detect: warning: 1 category with boxes in {tiny[1][0]} but none in {train} "
                      f"(never trained on, each scores 0 AP in the mean): 7 'disc'; add training boxes of them, or "
                      f"leave them out of the validation file"], err


def test_splits_with_boxes_of_every_category_say_nothing_of_it(tiny, tmp_path, monkeypatch, capsys):
    assert "warning" not in _started(tiny, tmp_path, monkeypatch, capsys, lambda data: None)


def test_many_untrained_categories_are_counted_and_an_unknown_split_says_nothing(tmp_path):
    ids = list(range(1, 9))
    entries = [{"id": i, "name": f"c{i}"} for i in ids]

    def split(name, boxed):
        return CocoSplit(tmp_path / name, tmp_path, {"categories": entries}, ids, CocoSummary(boxed=boxed))

    said = detect.untrained_categories(split("val.json", ids), split("train.json", [8]))
    assert said.startswith(f"7 categories with boxes in {tmp_path / 'val.json'} but none in ")
    assert ": 1 'c1', 2 'c2', 3 'c3', 4 'c4', 5 'c5' and 2 more; add" in said
    assert detect.untrained_categories(split("val.json", ids), split("train.json", None)) is None  # not known


def test_a_category_boxed_in_neither_split_is_named_and_one_boxed_somewhere_is_not(tmp_path):
    """A category the files list with no box in either (an export's class never drawn) is left out of the AP mean:
    warned of as such, not as never trained on."""
    entries = [{"id": i, "name": name} for i, name in ((3, "ring"), (7, "disc"), (12, "zebra"))]

    def split(name, boxed):
        return CocoSplit(tmp_path / name, tmp_path, {"categories": entries}, [3, 7, 12], CocoSummary(boxed=boxed))

    val, train = split("val.json", [3]), split("train.json", [3, 7])
    assert detect.unboxed_categories(val, train) == (
        f"1 category of the files with a box in neither {tmp_path / 'train.json'} nor {tmp_path / 'val.json'} (left "
        f"out of the AP mean; the head still has an output for each, trained only to say no): 12 'zebra'; add boxes "
        f"of them, or leave them out of both files' categories")
    assert detect.untrained_categories(val, train) is None  # 7 is trained on, 12 scored nowhere
    assert detect.unboxed_categories(val, split("train.json", [3, 7, 12])) is None
    assert detect.unboxed_categories(val, split("train.json", None)) is None  # not known
