"""A `--data` without train/ and val/ (knn, linprobe, finetune) is refused in one line that says what it is instead
and what to pass: a split given for the root names the root, a folder of images is named a folder to pretrain on."""

import re

import pytest
from PIL import Image

from lomar.cli.app import main
from lomar.data.folder import LabelledImageFolder


@pytest.fixture
def labelled(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "set" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "set" / split / "cat" / "a.jpg")
    photos = tmp_path / "My Photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "IMG_1.jpg")
    return tmp_path


def test_a_split_given_for_the_root_names_the_root_to_pass(labelled):
    split, root = re.escape(str(labelled / "set" / "train")), re.escape(str(labelled / "set"))
    with pytest.raises(ValueError, match=rf"^{split} holds no train/ folder: it is a split itself; pass its parent "
                                         rf"{root} \(which holds train/ and val/\)$"):
        LabelledImageFolder(labelled / "set" / "train" / "train")


def test_a_folder_of_images_is_named_a_folder_to_pretrain_on(labelled):
    photos = re.escape(str(labelled / "My Photos"))
    with pytest.raises(ValueError, match=r"holds no val/ folder: it holds images, not class folders \(a folder to "
                                         rf"pretrain on: lomar pretrain --data '{photos}'\); labelled "
                                         r"images go in ROOT/train/CLASS/IMAGE and ROOT/val/CLASS/IMAGE$"):
        LabelledImageFolder(labelled / "My Photos" / "val")


def test_finetune_says_the_same_of_its_data_and_names_a_missing_one(labelled, capsys):
    """finetune names the --data given and what it holds, not 'DATA/train/train', a path the user never wrote."""
    def error(data):
        assert main(["finetune", "--pretrained", str(labelled / "none.pt"), "--data", str(data)]) == 2
        return capsys.readouterr().err.strip()

    assert error(labelled / "set" / "train").endswith(f"it is a split itself; pass its parent {labelled / 'set'} "
                                                      f"(which holds train/ and val/)")
    assert "it holds images, not class folders (a folder to pretrain on" in error(labelled / "My Photos")
    assert error(labelled / "gone") == (f"lomar finetune: error: --data {labelled / 'gone'} is not a folder; finetuning"
                                        f" needs ImageFolder class folders (ROOT/train/CLASS/IMAGE and "
                                        f"ROOT/val/CLASS/IMAGE)")
