"""The instances file and image folder a detection run is given: a folder given for the file is named as a folder,
and images the file lists but the folder lacks are refused with the fix that fits (some there, or none)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lomar.data.coco import read_coco
from lomar.data.coco_values import check_coco_paths
from lomar.errors import UsageError


def test_a_folder_given_for_the_instances_file_is_named_a_folder_with_the_files_it_holds(tmp_path):
    # an images or annotations folder passed for the file is there, not missing: it is named as what it is
    (tmp_path / "annotations").mkdir()
    for name in ("instances_val.json", "instances_train.json"):
        (tmp_path / "annotations" / name).write_text("{}")
    with pytest.raises(UsageError) as refused:
        check_coco_paths(tmp_path / "annotations", None, "--val-ann", "--val-images")
    assert str(refused.value) == (f"--val-ann {tmp_path / 'annotations'} is a folder; pass a COCO instances JSON "
                                  f"file, e.g. one it holds: instances_train.json, instances_val.json")
    (tmp_path / "images").mkdir()
    with pytest.raises(UsageError, match=r"images is a folder; pass a COCO instances JSON file$"):
        check_coco_paths(tmp_path / "images", None, "--train-ann", "--train-images")
    with pytest.raises(UsageError, match=r"gone.json does not exist; pass a COCO instances JSON file$"):
        check_coco_paths(tmp_path / "gone.json", None, "--train-ann", "--train-images")


def test_images_listed_but_missing_are_refused_with_the_fix_for_some_missing_or_all(tmp_path):
    # an export of which one file was lost: the folder is right, the file lists an image it does not hold
    (tmp_path / "images" / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "images" / "sub" / "a.png")
    images = [{"id": i, "file_name": f"sub/{name}.png", "width": 30, "height": 20} for i, name in enumerate("abc")]
    ann = [{"id": 1, "image_id": 0, "category_id": 5, "bbox": [2, 2, 9, 9], "segmentation": [[2, 2, 11, 2, 11, 11]]}]
    (path := tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": ann,
                                                           "categories": [{"id": 5, "name": "x"}]}))
    with pytest.raises(UsageError) as refused:
        read_coco(path, tmp_path / "images")
    assert str(refused.value) == (f"{path}: lists 2 image(s) not found under {tmp_path / 'images'}, e.g. sub/b.png; "
                                  f"the other 1 are there: add the missing files, or remove their images and "
                                  f"annotations from the file (or pass a folder holding all as --train-images)")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(UsageError, match=r"e\.g\. sub/a\.png; pass the folder holding them as --train-images, or fix "
                                         r"the file_name entries$"):
        read_coco(path, tmp_path / "elsewhere")
