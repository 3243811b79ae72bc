"""A class folder without an image, by the one rule of every classification command (knn, linprobe, finetune, and
the class names a classifier saves for predict): a training folder without an image is no class, in both splits."""

import logging
import os

import pytest

from helpers import write_images
from lomar.data.class_names import relabel
from lomar.data.decode import load_image
from lomar.data.folder import LabelledImageFolder
from lomar.eval.features import knn_loaders


def _splits(root, train: dict[str, int], val: dict[str, int]):
    for split, counts in (("train", train), ("val", val)):
        for name, count in counts.items():
            (root / split / name).mkdir(parents=True)
            write_images(root / split / name, count, size=(8, 8))
    return root


def test_an_empty_training_class_folder_is_no_class_in_either_split_wherever_it_sorts(tmp_path, caplog):
    # "aa" sorts first, "zz" last: neither may shift an index or leave an output never trained on
    # "yak": an empty val folder of no training class, no class either
    root = _splits(tmp_path, {"aa": 0, "cat": 2, "dog": 1, "zz": 0}, {"aa": 0, "cat": 1, "dog": 1, "yak": 0})
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        train, val = (loader.dataset for loader in knn_loaders(root, workers=0))
    assert train.classes == val.classes == ["cat", "dog"]
    assert train.targets == [0, 0, 1] and val.targets == [0, 1]
    assert [r.getMessage() for r in caplog.records] == [
        f"{root / 'train'}: 3 class folder(s) without a training image, e.g. {root / 'train' / 'aa'}: no class, in "
        f"{root / 'val'} too; add its training images or remove the folder"]


def test_an_empty_held_out_folder_of_no_training_class_is_told_to_get_training_images(tmp_path, caplog):
    """Images added to the folder named, val/yak, would make it a class only val holds, which is refused."""
    root = _splits(tmp_path, {"cat": 1, "dog": 1}, {"cat": 1, "dog": 1, "yak": 0})
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        train, val = (loader.dataset for loader in knn_loaders(root, workers=0))
    assert train.classes == val.classes == ["cat", "dog"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{root / 'train'}: 1 class folder(s) without a training image, e.g. {root / 'val' / 'yak'}: no class, in "
        f"{root / 'val'} too; add its training images or remove the folder"]


def test_a_held_out_folder_without_an_image_stays_a_class_without_a_sample(tmp_path, caplog):
    root = _splits(tmp_path, {"cat": 1, "dog": 1, "owl": 1}, {"cat": 1, "dog": 0, "owl": 1})
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        train, val = (loader.dataset for loader in knn_loaders(root, workers=0))
    assert train.classes == val.classes == ["cat", "dog", "owl"] and val.targets == [0, 2]
    assert [r.getMessage() for r in caplog.records] == [
        f"{root / 'val'}: 1 class folder(s) without an image, e.g. {root / 'val' / 'dog'}: no held-out sample of that "
        f"class; add its images"]


def test_held_out_images_of_a_class_whose_training_folder_is_empty_are_refused_naming_both(tmp_path):
    root = _splits(tmp_path, {"cat": 1, "dog": 1, "owl": 0}, {"cat": 1, "dog": 1, "owl": 1})
    with pytest.raises(ValueError, match=f"^{root / 'train' / 'owl'} holds no image, {root / 'val' / 'owl'} holds "
                                         f"some: a class with nothing to learn from; add its training images, or "
                                         f"remove both folders$"):
        knn_loaders(root, workers=0)


def test_a_classifiers_held_out_folder_without_an_image_that_it_does_not_name_is_left_out(tmp_path):
    """finetune --eval-only: the classifier, trained without the empty folder, scores a split that still holds it."""
    root = _splits(tmp_path, {}, {"cat": 1, "dog": 1, "zz": 0})
    val = LabelledImageFolder(root / "val")
    relabel(val, ["dog", "cat"], 2, "best.pt")
    assert val.classes == ["dog", "cat"] and val.targets == [1, 0]


def test_one_class_with_images_beside_empty_ones_is_not_two_classes(tmp_path):
    root = _splits(tmp_path, {"cat": 2, "dog": 0}, {"cat": 1, "dog": 0})
    with pytest.raises(ValueError, match=r"holds one class folder with images \(cat\); a classifier needs at least "
                                         r"two"):
        knn_loaders(root, workers=0)
    with pytest.raises(ValueError, match=r"holds one class folder with images \(cat\), and 1 class folder without an "
                                         r"image; a classifier needs at least two"):
        LabelledImageFolder(root / "train").check_classes()  # a study's check, before any pairing


def _unreadable(folder, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"bad{i}.jpg").write_bytes(b"not an image")


@pytest.mark.parametrize("name", ["aa", "zz"])
def test_a_training_class_of_unreadable_images_is_no_class_in_either_split_wherever_it_sorts(tmp_path, caplog, name):
    """A class no training image can be read of teaches nothing: left in, linprobe's probe (sized by the largest
    label read) would lack its row or hold an untrained one, and finetune an output never trained. Its files go too:
    read, they would carry no label."""
    root = _splits(tmp_path, {"cat": 2, "dog": 1}, {"cat": 1, "dog": 1})
    _unreadable(root / "train" / name, 2)
    (root / "val" / name).mkdir()
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        train, val = (loader.dataset for loader in knn_loaders(root, workers=0))
    assert train.classes == val.classes == ["cat", "dog"]
    assert train.targets == [0, 0, 1] and val.targets == [0, 1] and len(train) == 3
    assert all(name not in str(path) for path in train.paths)
    assert [r.getMessage() for r in caplog.records] == [
        f"{root / 'train'}: 1 class folder(s) without a readable training image, e.g. {root / 'train' / name} (2 "
        f"images, none readable: cannot decode image {root / 'train' / name / 'bad0.jpg'}: not an image format lomar "
        f"reads (JPEG, PNG, GIF, BMP, TIFF, WebP; 12 bytes starting b'not an i')): no class, in {root / 'val'} "
        f"too; fix or replace its images or remove the folder"]


def test_held_out_images_of_a_class_whose_training_images_are_all_unreadable_are_refused_naming_both(tmp_path):
    root = _splits(tmp_path, {"cat": 1, "dog": 1}, {"cat": 1, "dog": 1, "owl": 1})
    _unreadable(root / "train" / "owl", 3)
    train, val = LabelledImageFolder(root / "train"), LabelledImageFolder(root / "val")  # as finetune pairs them
    with pytest.raises(ValueError, match=f"^{root / 'train' / 'owl'} holds 3 images, none readable \\(e.g. cannot "
                                         f"decode image .*bad0.jpg: not an image format.*\\), {root / 'val' / 'owl'} "
                                         f"holds some: a class with nothing to learn from; fix or replace its training "
                                         f"images, or remove both folders$"):
        train.match_classes(val)


def test_a_class_is_read_up_to_its_first_readable_image(tmp_path):
    """The cost of knowing that a class can be learnt from: one decode a class, more only past unreadable files."""
    root = _splits(tmp_path, {"cat": 3, "dog": 2}, {"cat": 1, "dog": 1})
    _unreadable(root / "train" / "cat", 1)  # bad0.jpg sorts before write_images' img000.png
    read = []

    def load(path):
        read.append(os.path.relpath(path, root / "train"))
        return load_image(path)

    train = LabelledImageFolder(root / "train", load=load)
    train.match_classes(LabelledImageFolder(root / "val"))
    assert train.classes == ["cat", "dog"] and len(train) == 6
    assert read == [os.path.join("cat", "bad0.jpg"), os.path.join("cat", "img000.png"),
                    os.path.join("dog", "img000.png")]
