"""An ADE20K-layout `--data` whose split folders are named otherwise (train/val, as many sets ship) is refused in one
line that names the folders it does hold, beside the layout segment reads."""

import pytest

from lomar.data.segmentation import SegmentationFolder


def test_a_missing_split_folder_names_the_folders_its_parent_holds(tmp_path):
    for part in ("images", "annotations"):
        for split in ("train", "val", ".cache"):
            (tmp_path / part / split).mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'images' / 'training'} is not a folder \(images/ holds "
                                         r"train, val\); --data needs ADE20K's layout: images/training/\*.jpg and "
                                         r"annotations/training/\*.png$"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)


def test_a_missing_split_folder_of_an_empty_or_absent_parent_adds_nothing(tmp_path):
    (tmp_path / "images" / "training").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'annotations' / 'training'} is not a folder; --data needs"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)
    (tmp_path / "annotations").mkdir()
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'annotations' / 'training'} is not a folder; --data needs"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)
