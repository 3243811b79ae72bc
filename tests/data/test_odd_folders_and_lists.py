"""Folders, lists and COCO files of real data sets: macOS metadata, hidden and thumbnail folders, images beside class
folders, unlistable folders, text lists of missing paths, COCO files with a byte order mark or two images of one
file, a data root holding train and val, and compose-digits' splits."""

import tarfile

import numpy as np
import pytest
from odd_files import _add, _items, _jpeg
from PIL import Image

from lomar.data.folder import LabelledImageFolder
from lomar.data.shards import TarShardDataset
from lomar.data.transforms import PretrainTransform


@pytest.mark.parametrize("images, fraction", [(2, 0.75), (4, 0.0001)])
def test_compose_digits_gives_each_split_a_picture_at_any_val_fraction(tmp_path, images, fraction):
    from lomar.data.compose import compose_digits

    summary = compose_digits(tmp_path / "s", img_size=32, images=images, val_fraction=fraction, per_image=(1, 1))
    assert all(summary["splits"][split]["images"] >= 1 for split in ("train", "val"))
    assert all(any((tmp_path / "s" / "images" / split).iterdir()) for split in ("train", "val"))


def test_compose_digits_bounds_the_classify_pictures_before_allocating_them(tmp_path, capsys):
    from lomar.cli.app import main
    from lomar.data.compose import compose_digits

    code = main(["compose-digits", "--out", str(tmp_path / "s"), "--img-size", "32", "--images", "2",
                 "--classify-images", "2", "--classify-size", "90000"])  # a 97 GB canvas, unless refused
    err = capsys.readouterr().err
    assert code == 2 and "--classify-size" in err and "8192" in err and err.count("\n") == 1
    for size in ({"classify_size": 90000, "classify_images": 2}, {"img_size": 90000}):
        with pytest.raises(ValueError, match="8192"):
            compose_digits(tmp_path / "t", **{"img_size": 32, "images": 2, **size})


def test_images_beside_the_class_folders_and_empty_classes_are_not_passed_over_unsaid(tmp_path, caplog):
    import logging

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "cat" / "a.jpg", tmp_path / "dog" / "b.jpg", tmp_path / "stray.jpg"):
        path.write_bytes(_jpeg())
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        folder = LabelledImageFolder(tmp_path)
    assert len(folder) == 2 and folder.classes == ["cat", "dog", "empty"]
    lines = [r.getMessage() for r in caplog.records]
    assert any("1 image(s) outside the class folders, e.g. stray.jpg, are not used" in line for line in lines)
    assert folder.empty == ["empty"]  # said by the pairing of the splits (tests/data/test_empty_class_folders.py)


def test_a_text_list_none_of_whose_first_paths_exists_is_refused_up_front(tmp_path):
    from lomar.data.folder import build_pretrain_dataset

    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(_jpeg())
    labelled = tmp_path / "train.txt"  # ImageNet's form: a label after each path
    labelled.write_text("".join(f"images/{i}.jpg {i}\n" for i in range(3)))
    with pytest.raises(ValueError, match=r"train.txt: none of its first 3 paths exists, e.g. .*images/0.jpg 0; its "
                                         r"lines look like 'path label': list one path a line, without labels"):
        build_pretrain_dataset(str(labelled), 16)
    elsewhere = tmp_path / "images" / "list.txt"  # relative to the working folder, not to the list's
    elsewhere.write_text("images/0.jpg\nimages/1.jpg\n")
    with pytest.raises(ValueError, match=r"relative paths are read from the list's folder .*images$"):
        build_pretrain_dataset(str(elsewhere), 16)
    # lines as a shell or a spreadsheet writes them: the hint is what is wrong with them, not the list's folder
    for name, line, words in [("quoted", f'"{tmp_path}/images/0.jpg"', "its paths are in quotes: write them without"),
                              ("tilde", "~/images/0.jpg", "'~' is not expanded in a list: write the home folder out"),
                              ("urls", f"file://{tmp_path}/images/0.jpg", "its lines are URLs: list the files' local")]:
        (tmp_path / f"{name}.txt").write_text(f"# mine\n{line}\n")
        with pytest.raises(ValueError, match=f"{name}.txt: none of its first 1 paths exists, .*; {words}"):
            build_pretrain_dataset(str(tmp_path / f"{name}.txt"), 16)
    fine = tmp_path / "fine.txt"  # some missing: skipped and counted when read, as before
    fine.write_text("images/missing.jpg\nimages/1.jpg\n")
    dataset = build_pretrain_dataset(str(fine), 16)
    assert dataset[0]["image"] is None and dataset[1]["image"] is not None


def test_macos_metadata_files_beside_the_photos_are_no_images(tmp_path, caplog):
    import logging

    from lomar.data.image_search import find_images

    (tmp_path / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")  # AppleDouble header
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert find_images(tmp_path) == [tmp_path / "a.jpg"]
    assert any("1 macOS metadata file(s) named ._IMAGE skipped" in r.getMessage() for r in caplog.records)
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as archive:  # macOS tar adds ._NAME members alike
        _add(archive, "x/a.jpg", _jpeg())
        _add(archive, "x/._a.jpg", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    assert TarShardDataset([shard], PretrainTransform(16)).count_samples() == 1 and list(_items(shard)) == ["x/a.jpg"]


def test_a_folder_that_cannot_be_listed_is_reported_not_passed_over(tmp_path, monkeypatch, caplog):
    import logging
    import os

    from lomar.data.image_search import find_images

    (tmp_path / "open").mkdir()
    (tmp_path / "locked").mkdir()
    (tmp_path / "open" / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "locked" / "b.jpg").write_bytes(_jpeg())
    real = os.scandir

    def scandir(path="."):  # what chmod 000 on another user's folder gives (the tests may run as root)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert find_images(tmp_path) == [tmp_path / "open" / "a.jpg"]
    assert any("1 folder(s) could not be listed, e.g. " in r.getMessage() and "locked (Permission denied)" in
               r.getMessage() for r in caplog.records)


def test_a_coco_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    import json

    from lomar.data.coco import read_coco

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(_jpeg())
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 30, "height": 20}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10],
                             "segmentation": [[0, 0, 10, 0, 10, 10]]}]}
    (tmp_path / "ann.json").write_bytes("\ufeff".encode() + json.dumps(coco).encode())  # as PowerShell writes it
    assert read_coco(tmp_path / "ann.json", tmp_path / "images").summary.boxes == 1


@pytest.mark.parametrize("second", ["c/y.JPG", "./c/y.JPG", "c//y.JPG", "link.JPG"])
def test_two_coco_images_naming_one_file_are_said_in_the_summary_line(tmp_path, second):
    """Each id is trained and scored as a photo of its own annotations only: right for a photo labelled twice
    (LIVECell's files hold such), not for one whose objects are split between ids; the summary line says how many
    images name a file another image names, and the first two."""
    import json

    from lomar.data.coco import read_coco

    (tmp_path / "images" / "c").mkdir(parents=True)
    for name in ("c/y.JPG", "c/z.JPG"):
        (tmp_path / "images" / name).write_bytes(_jpeg())
    (tmp_path / "images" / "link.JPG").symlink_to("c/y.JPG")
    names = ["c/z.JPG", "c/y.JPG", second]
    coco = {"images": [{"id": 7 + i, "file_name": name, "width": 30, "height": 20} for i, name in enumerate(names)],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": i, "image_id": 7 + i, "category_id": 1, "bbox": [0, 0, 10, 10],
                             "segmentation": [[0, 0, 10, 0, 10, 10]]} for i in range(3)]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    split = read_coco(tmp_path / "ann.json", tmp_path / "images")
    assert [a["image_id"] for a in split.data["annotations"]] == [7, 8, 9]  # each id keeps its own
    assert (split.summary.shared, split.summary.shared_first) == (
        1, f"images[1] (id 8, 'c/y.JPG') and images[2] (id 9, {second!r})")
    assert split.summary.line().endswith(
        f"1 images naming a file an earlier image names, e.g. images[1] (id 8, 'c/y.JPG') and images[2] (id 9, "
        f"{second!r}) (each trained and scored as a photo of only its own annotations)")
    coco["images"][2]["file_name"] = "c/z.JPG"  # the count: c/z.JPG twice too
    coco["images"].append({"id": 20, "file_name": "./c/y.JPG", "width": 30, "height": 20})
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    summary = read_coco(tmp_path / "ann.json", tmp_path / "images").summary
    assert (summary.shared, summary.shared_first) == (2, "images[0] (id 7, 'c/z.JPG') and images[2] (id 9, 'c/z.JPG')")
    coco["images"] = coco["images"][:2] + [{"id": 9, "file_name": "c/x.JPG", "width": 30, "height": 20}]  # 3 files
    (tmp_path / "images" / "c" / "x.JPG").write_bytes(_jpeg())
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    summary = read_coco(tmp_path / "ann.json", tmp_path / "images").summary
    assert (summary.shared, summary.shared_first) == (0, "") and "naming a file" not in summary.line()


def test_a_coco_image_whose_stat_fails_otherwise_than_absent_is_not_called_missing(tmp_path):
    """A name too long (or a folder denied) is said as what it is by the command's OSError line: it is no missing
    image to look for under the folder."""
    import errno
    import json

    from lomar.data.coco import read_coco

    (tmp_path / "images").mkdir()
    coco = {"images": [{"id": 1, "file_name": "x" * 300 + ".jpg", "width": 30, "height": 20}],
            "categories": [{"id": 1, "name": "x"}], "annotations": []}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    with pytest.raises(OSError) as caught:
        read_coco(tmp_path / "ann.json", tmp_path / "images")
    assert caught.value.errno == errno.ENAMETOOLONG


def test_macos_metadata_files_in_a_segmentation_folder_are_no_pairs(tmp_path):
    from lomar.data.segmentation import SegmentationFolder

    for kind in ("images", "annotations"):
        (tmp_path / kind / "training").mkdir(parents=True)
    (tmp_path / "images" / "training" / "a.jpg").write_bytes(_jpeg())
    Image.fromarray(np.ones((20, 30), np.uint8)).save(tmp_path / "annotations" / "training" / "a.png")
    for kind, name in (("images", "._a.jpg"), ("annotations", "._a.png")):
        (tmp_path / kind / "training" / name).write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    assert len(SegmentationFolder(tmp_path, "training", num_classes=1, crop=16, workers=1)) == 1


def test_a_data_root_holding_train_and_val_says_both_are_read(tmp_path, caplog):
    import logging

    from lomar.data.folder import build_image_list

    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "a.jpg").write_bytes(_jpeg())
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert len(build_image_list(tmp_path)) == 2
        assert len(build_image_list(tmp_path / "train")) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"holds train/ and val/: every image under it is read, val/ included; pass " \
        f"{tmp_path / 'train'}" in lines[0]


def test_jpegs_under_their_other_names_are_images(tmp_path):
    """A photo Chrome saves as .jfif (or a .jpe) is a JPEG like any other: found and read, not passed over."""
    from lomar.data.decode import load_image
    from lomar.data.image_search import find_images

    for name in ("a.JFIF", "b.jpe", "c.jpg"):
        (tmp_path / name).write_bytes(_jpeg())
    assert find_images(tmp_path) == [tmp_path / n for n in ("a.JFIF", "b.jpe", "c.jpg")]
    assert load_image(tmp_path / "a.JFIF").shape == load_image(tmp_path / "c.jpg").shape


def test_hidden_and_thumbnail_folders_are_not_searched_and_said(tmp_path, caplog):
    """A NAS's thumbnails (@eaDir), a viewer's .thumbnails and macOS zips' __MACOSX are not searched for photos to
    train on, and the folders passed over are said."""
    import logging

    from lomar.data.image_search import find_images

    for name in ("a.jpg", "sub/b.jpg", "@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg", ".thumbnails/normal/c.png",
                 "sub/__MACOSX/d.jpg", ".hidden/e.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(_jpeg())
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert find_images(tmp_path) == [tmp_path / "a.jpg", tmp_path / "sub" / "b.jpg"]
    assert any("4 hidden or thumbnail folder(s) not searched, e.g. " in r.getMessage() for r in caplog.records)
    assert find_images(tmp_path / ".hidden") == [tmp_path / ".hidden" / "e.jpg"]  # asked for by name: searched
