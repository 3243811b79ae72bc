"""An ADE20K-layout `--data` whose split folders are named otherwise (train/val, as many sets ship) is refused in one
line that names the folders it does hold (a root without images/ or annotations/: what the root holds), beside the
layout segment reads; an image whose annotation is there in another format than PNG is refused naming that file."""

import pytest
from PIL import Image

from lomar.data.segmentation import SegmentationFolder


def test_a_missing_split_folder_names_the_folders_its_parent_holds(tmp_path):
    for part in ("images", "annotations"):
        for split in ("train", "val", ".cache"):
            (tmp_path / part / split).mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'images' / 'training'} is not a folder \(images/ holds "
                                         r"train, val\); --data needs ADE20K's layout: images/training/\*.jpg and "
                                         r"annotations/training/\*.png$"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)


def test_a_missing_split_folder_of_an_empty_parent_adds_nothing(tmp_path):
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations").mkdir()
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'annotations' / 'training'} is not a folder; --data needs"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)


def test_a_root_without_the_images_folder_names_what_it_holds(tmp_path):
    for name in ("train", "val", ".cache"):
        (tmp_path / name).mkdir()
    (tmp_path / "README.txt").write_text("a set laid out otherwise")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'images' / 'training'} is not a folder \({tmp_path} has no "
                                         r"images/ folder; it holds train, val, README.txt\); --data needs ADE20K's "
                                         r"layout: images/training/\*.jpg and annotations/training/\*.png$"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)
    (tmp_path / "images" / "training").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'annotations' / 'training'} is not a folder \({tmp_path} "
                                         r"has no annotations/ folder; it holds images, train, val, README.txt\);"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)


def test_an_annotation_saved_as_another_format_is_named_where_its_png_is_missing(tmp_path):
    for part in ("images", "annotations"):
        (tmp_path / part / "training").mkdir(parents=True)
    for stem in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / "training" / f"{stem}.jpg")
    Image.new("L", (8, 8)).save(tmp_path / "annotations" / "training" / "a.jpg")
    Image.new("L", (8, 8)).save(tmp_path / "annotations" / "training" / "b.png")
    labels = tmp_path / "annotations" / "training"
    with pytest.raises(ValueError, match=rf"has no annotation {labels / 'a.png'} \(1 image\(s\) without one; a.jpg "
                                         r"there is not read: annotations are PNGs of class ids\); add it"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)
    (labels / "a.jpg").unlink()
    with pytest.raises(ValueError, match=r"\(1 image\(s\) without one\); add it or remove the image$"):
        SegmentationFolder(tmp_path, "training", num_classes=2, crop=16, workers=1)
