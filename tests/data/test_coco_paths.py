"""The instances file and image folder a detection run is given: a folder given for the file is named as a folder."""

from __future__ import annotations

import pytest

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
