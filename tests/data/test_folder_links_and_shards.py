"""Reading image folders and shards reliably: symlinked folders and images used once, class folders (hidden, linked
back, odd across splits), unreadable images skipped and reported through workers, bad roots and missing splits
named, and shards (damaged, an oversized member, brace patterns counted before expansion)."""

import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from crafted_pngs import _png
from torch.utils.data import DataLoader

from lomar.data.collate import collate_labelled, collate_labelled_refill
from lomar.data.decode import (
    load_image,
)
from lomar.data.folder import LabelledImageFolder, build_image_list
from lomar.data.image_search import find_images
from lomar.data.shards import TarShardDataset
from lomar.data.transforms import PretrainTransform


@pytest.mark.skipif(not hasattr(__import__("os"), "symlink"), reason="needs symlinks")
def test_symlinked_folders_are_followed_once_and_dangling_links_kept(tmp_path, caplog):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    elsewhere.mkdir()
    _png(root / "a" / "one.png")
    _png(elsewhere / "two.png")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # back to an ancestor
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        found = find_images(root)
    names = [p.relative_to(root).as_posix() for p in found]
    assert names == ["a/one.png", "gone.png", "linked/two.png"]
    assert "loop" in caplog.text
    assert list(build_image_list(root)) == found
    with pytest.raises(ValueError, match=r"cannot read .*gone.png: it is a link to .*missing.png, which does not "
                                         r"exist; fix or remove the link$"):
        load_image(root / "gone.png")
    with pytest.raises(ValueError, match=r"cannot read .*absent.png: No such file or directory$"):
        load_image(root / "absent.png")
    (root / "chain.png").symlink_to("gone.png")  # a link to that link: gone.png exists, missing.png does not
    with pytest.raises(ValueError, match=r"cannot read .*chain.png: it is a link to gone.png, which links on to "
                                         r".*/missing.png, which does not exist; fix or remove the link$"):
        load_image(root / "chain.png")


@pytest.mark.skipif(not hasattr(__import__("os"), "symlink"), reason="needs symlinks")
def test_a_link_to_an_image_listed_already_is_used_once(tmp_path, caplog):
    """A folder of links into another searched folder (a curated subset) gave each such image twice an epoch."""
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for folder in (root / "all", root / "subset", elsewhere):
        folder.mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        (root / "all" / f"{name}.jpg").write_bytes(b"x")
    (elsewhere / "e.jpg").write_bytes(b"x")
    (root / "subset" / "a.jpg").symlink_to("../all/a.jpg")
    (root / "subset" / "b.jpg").symlink_to(root / "all" / "b.jpg")
    (root / "a_first.jpg").symlink_to("all/c.jpg")  # sorted before all/c.jpg: the file's own path is the one kept
    (root / "subset" / "chain.jpg").symlink_to(tmp_path / "hop.jpg")  # a link to a link outside, to all/d.jpg
    (tmp_path / "hop.jpg").symlink_to(root / "all" / "d.jpg")
    (root / "subset" / "gone.jpg").symlink_to("../all/missing.jpg")  # dangling: kept, as any
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    for name in ("x.jpg", "y.jpg"):
        (root / "subset" / name).symlink_to(elsewhere / "e.jpg")  # listed as linked/e.jpg too
    (root / "subset" / "z.jpg").symlink_to(tmp_path / "outside.jpg")
    (root / "subset" / "zz.jpg").symlink_to(tmp_path / "outside.jpg")
    (tmp_path / "outside.jpg").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        found = find_images(root)
        classes = LabelledImageFolder(root)  # each class searched alone: its links into another class are its own
    assert [p.relative_to(root).as_posix() for p in found] == [
        "all/a.jpg", "all/b.jpg", "all/c.jpg", "all/d.jpg", "linked/e.jpg", "subset/gone.jpg", "subset/z.jpg"]
    assert [Path(p).relative_to(root).as_posix() for p in classes.paths] == [
        "all/a.jpg", "all/b.jpg", "all/c.jpg", "all/d.jpg", "linked/e.jpg", "subset/a.jpg", "subset/b.jpg",
        "subset/chain.jpg", "subset/gone.jpg", "subset/x.jpg", "subset/z.jpg"]
    assert [r.getMessage() for r in caplog.records][:2] == [
        f"{root}: 7 symlink(s) lead to an image already listed (e.g. {root / 'a_first.jpg'} and "
        f"{root / 'all' / 'c.jpg'} are one file); used once",
        f"{root}: 2 symlink(s) lead to an image already listed (e.g. {root / 'subset' / 'y.jpg'} and "
        f"{root / 'subset' / 'x.jpg'} are one file); used once"]


@pytest.mark.skipif(not hasattr(__import__("os"), "symlink"), reason="needs symlinks")
def test_a_class_folder_linking_back_to_the_root_does_not_take_the_other_classes_images(tmp_path, caplog):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        _png(tmp_path / label / "0.png")
    (tmp_path / "cat" / "up").symlink_to(tmp_path, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        dataset = LabelledImageFolder(tmp_path)
    assert [(Path(p).relative_to(tmp_path).as_posix(), y) for p, y in dataset.samples] == [("cat/0.png", 0),
                                                                                          ("dog/0.png", 1)]
    assert "loop" in caplog.text


def test_a_hidden_folder_is_no_class(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        _png(tmp_path / label / "0.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # Jupyter makes one wherever a notebook is opened
    dataset = LabelledImageFolder(tmp_path)
    assert dataset.classes == ["cat", "dog"] and dataset.targets == [0, 1]


def test_splits_with_other_class_folders_are_refused_naming_the_odd_ones(tmp_path):
    for split, labels in (("train", ("cat", "dog", "owl")), ("val", ("cat", "dog", "yak"))):
        for label in labels:
            (tmp_path / split / label).mkdir(parents=True)
            _png(tmp_path / split / label / "0.png")
    train, val = LabelledImageFolder(tmp_path / "train"), LabelledImageFolder(tmp_path / "val")
    with pytest.raises(ValueError, match=rf"only in {tmp_path / 'train'}: \['owl'\], only in {tmp_path / 'val'}: "
                                         rf"\['yak'\]; give both splits the same class folders"):
        train.match_classes(val)
    train.match_classes(train)


def test_labelled_folder_skips_and_reports_unreadable_images(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            _png(tmp_path / label / f"{i}.png", seed=i)
    (tmp_path / "dog" / "broken.png").write_bytes(b"garbage")
    to_tensor = lambda img: torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    dataset = LabelledImageFolder(tmp_path, to_tensor)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 7
    batches = list(DataLoader(dataset, batch_size=4, collate_fn=collate_labelled))
    assert sum(len(b[1]) for b in batches) == 6
    assert [p for b in batches for p in b.bad] == [str(tmp_path / "dog" / "broken.png")]
    images, targets = next(iter(DataLoader(dataset, batch_size=7, collate_fn=collate_labelled_refill)))
    assert images.shape[0] == targets.shape[0] == 7  # a training batch keeps its size (mixup pairs)


def test_labelled_batches_keep_their_bad_list_through_workers(tmp_path):
    (tmp_path / "only").mkdir()
    _png(tmp_path / "only" / "good.png")
    (tmp_path / "only" / "bad.png").write_bytes(b"x")
    loader = DataLoader(LabelledImageFolder(tmp_path, lambda img: torch.zeros(1)), batch_size=2, num_workers=1,
                        collate_fn=collate_labelled)
    (batch,) = list(loader)
    assert batch.bad == [str(tmp_path / "only" / "bad.png")] and batch[1].tolist() == [0]


@pytest.mark.parametrize("make, words", [
    (lambda root: None, "root does not exist: expected a folder of class folders"),
    (lambda root: root.write_bytes(b"x"), "root is not a folder: expected a folder of class folders"),
    (lambda root: root.mkdir(), "holds no class folders"),
    (lambda root: (root / "empty").mkdir(parents=True), "no images found in the class folders"),
])
def test_labelled_folder_bad_roots(tmp_path, make, words):
    make(tmp_path / "root")
    with pytest.raises(ValueError, match=words):
        LabelledImageFolder(tmp_path / "root")


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_missing_split_is_named_as_its_data_folders_lack(tmp_path, split):
    # knn / linprobe given a folder of images (or of class folders) as --data: the split it lacks, not "DATA/train
    # is not a folder of class folders", a path the user never wrote
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"photos holds no {split}/ folder: expected the split's class folders"):
        LabelledImageFolder(tmp_path / "photos" / split)


def test_a_damaged_shard_is_reported_once_and_counted(tmp_path, caplog):
    good = tmp_path / "a.tar"
    with tarfile.open(good, "w") as archive:
        archive.add(_png(tmp_path / "x.png"), arcname="x.png")
    (tmp_path / "b.tar").write_bytes(b"not a tar file" * 100)
    dataset = TarShardDataset([good, tmp_path / "b.tar"], PretrainTransform(16), shuffle_buffer=1)
    with caplog.at_level(logging.DEBUG, logger="lomar.data"):
        assert dataset.count_samples() == 1
        items = list(dataset) + list(dataset)
    assert len(items) == 2 and list(dataset.damaged) == [str(tmp_path / "b.tar")]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "b.tar" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()  # tarfile's reason lists each compression it tried, a line each


def test_a_shard_member_over_the_byte_limit_is_skipped_unread(tmp_path, monkeypatch):
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as archive:
        archive.add(_png(tmp_path / "big.png", size=(64, 64)), arcname="big.png")
        archive.add(_png(tmp_path / "small.png", size=(4, 4)), arcname="small.png")
    limit = (tmp_path / "big.png").stat().st_size - 1
    assert (tmp_path / "small.png").stat().st_size <= limit
    monkeypatch.setenv("LOMAR_MAX_IMAGE_BYTES", str(limit))
    read = []
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m, _real=tarfile.TarFile.extractfile:
                        read.append(m.name) or _real(self, m))
    items = {Path(item["path"]).name.split(":")[-1]: item for item in TarShardDataset([shard], PretrainTransform(16),
                                                                                         shuffle_buffer=1)}
    assert items["big.png"]["image"] is None and items["small.png"]["image"] is not None
    assert read == ["small.png"]


def test_brace_patterns_are_counted_before_they_are_expanded(tmp_path):
    from lomar.data.shards import shard_paths

    for name in ("s-00.tar", "s-01.tar", "s-02.tar"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in shard_paths(str(tmp_path / "s-{00..02}.tar"))] == ["s-00.tar", "s-01.tar", "s-02.tar"]
    with pytest.raises(ValueError, match=r"names 1,000,000,000 shards, over the 1,000,000 lomar reads"):
        shard_paths(str(tmp_path / "s-{000000000..999999999}.tar"))  # refused at once, not made
    with pytest.raises(ValueError, match=r"names 2,000,000 shards"):
        shard_paths(str(tmp_path / "s-{0..1999}-{0..999}.tar"))
    with pytest.raises(ValueError, match=r"names 2 shard\(s\) that do not exist, e.g. .*s-03.tar; fix the brace range"):
        shard_paths(str(tmp_path / "s-{00..04}.tar"))  # named one by one: a missing one is no smaller data set
    assert len(shard_paths(str(tmp_path / "s-{00..04}*.tar"))) == 3  # a wildcard may match nothing
    for bad in ("s-{00..0x}.tar", "s-{00..02.tar"):
        with pytest.raises(ValueError, match=r"each brace must close and hold a range of whole numbers"):
            shard_paths(str(tmp_path / bad))
