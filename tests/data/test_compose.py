"""The composed digits set: deterministic, and the same pictures in COCO and ADE20K layouts that agree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lomar.checkpoints import file_lock
from lomar.cli.app import main
from lomar.data.compose import compose_digits, rle_encode
from lomar.errors import UsageError


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "set"
    compose_digits(root, img_size=64, images=6, seed=3, classify_images=4, classify_size=48)
    return root


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(composed, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    compose_digits(again, img_size=64, images=6, seed=3, classify_images=4, classify_size=48)
    compose_digits(other, img_size=64, images=6, seed=4, classify_images=4, classify_size=48)
    assert _files(again) == _files(composed)
    assert _files(other) != _files(composed)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_coco_json_loads_in_pycocotools_and_agrees_with_the_ade_label_maps(composed):
    from pycocotools.coco import COCO

    for split, ade in (("train", "training"), ("val", "validation")):
        coco = COCO(str(composed / "annotations" / f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [str(d) for d in range(10)]
        assert coco.getCatIds() == list(range(1, 11))
        for image in coco.loadImgs(coco.getImgIds()):
            stem = image["file_name"].rsplit(".", 1)[0]
            assert (composed / "images" / split / image["file_name"]).read_bytes() == \
                (composed / "images" / ade / image["file_name"]).read_bytes()
            labels = np.asarray(Image.open(composed / "annotations" / ade / f"{stem}.png"))
            assert labels.shape == (64, 64) and labels.dtype == np.uint8 and labels.max() <= 10
            painted = np.zeros_like(labels)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
            assert anns, image
            for ann in anns:
                mask = coco.annToMask(ann).astype(bool)
                assert ann["iscrowd"] == 0 and ann["area"] == mask.sum() > 0
                x, y, w, h = ann["bbox"]
                rows, cols = np.nonzero(mask)
                assert (x, y, x + w - 1, y + h - 1) == (cols.min(), rows.min(), cols.max(), rows.max())
                assert not painted[mask].any()  # instances do not overlap
                painted[mask] = ann["category_id"]  # category d + 1 is the ADE label d + 1
            assert (painted == labels).all()


def test_digit_samples_do_not_cross_splits(tmp_path):
    summary = compose_digits(tmp_path / "s", img_size=48, images=4, seed=0)
    assert summary["splits"]["train"]["digit_samples"] + summary["splits"]["val"]["digit_samples"] == 1797
    assert summary == json.loads((tmp_path / "s" / "compose.json").read_text())


def test_classification_variant_is_an_image_folder(composed):
    for split, count in (("train", 3), ("val", 1)):
        folders = sorted(p.name for p in (composed / "classify" / split).iterdir())
        assert folders == [str(d) for d in range(10)]
        pictures = list((composed / "classify" / split).rglob("*.jpg"))
        assert len(pictures) == count and Image.open(pictures[0]).size == (48, 48)


def test_rle_is_pycocotools_rle():
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) > 0.5, np.ones((3, 4), bool), np.zeros((2, 2), bool)):
        rle = coco_mask.frPyObjects(rle_encode(mask), *mask.shape)
        assert (coco_mask.decode(rle) == mask).all()


def test_command_writes_and_refuses_a_full_folder(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["compose-digits", "--out", str(out), "--img-size", "48", "--images", "3"]) == 0
    printed = capsys.readouterr()  # the default LOW 0.12 of 48 px is 5.76 px: drawn at 8, and said so on stderr
    assert "wrote" in printed.out
    assert "note: digits under 8 px are drawn at 8 px (--digit-scale 0.12 x --img-size 48" in printed.err
    assert main(["compose-digits", "--out", str(out), "--img-size", "48", "--images", "3"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and err.count("\n") == 1
    assert main(["compose-digits", "--out", str(out), "--img-size", "16"]) == 2
    assert "--img-size must be >= 32" in capsys.readouterr().err
    assert main(["compose-digits", "--out", str(out), "--img-size", "48", "--images", "3", "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["compose-digits", "--out", str(out), "--img-size", "48", "--images", "3", "--overwrite",
                 "--classify-images", "4", "--classify-size", "32"]) == 0
    printed = capsys.readouterr().out  # the classification set is said, and 1 is not "1 pictures"
    assert "val: 1 picture, " in printed and ", 1 one-digit picture in classify/val/" in printed, printed
    assert ", 3 one-digit pictures in classify/train/" in printed, printed


def test_overwrite_deletes_no_folder_compose_digits_did_not_write(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "mine.jpg").write_bytes(b"precious")
    code = main(["compose-digits", "--out", str(tmp_path), "--img-size", "48", "--images", "3", "--overwrite"])
    assert code == 2 and (tmp_path / "photos" / "mine.jpg").read_bytes() == b"precious"
    err = capsys.readouterr().err
    assert f"{tmp_path} holds files compose-digits did not write (no compose.json)" in err and err.count("\n") == 1


def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno
    from pathlib import Path

    write, writes = Path.write_bytes, []

    def filling(self, data):  # the disk fills at the third picture: the OSError of a write names no file
        writes.append(self)
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(Path, "write_bytes", filling)
    out = tmp_path / "set"
    assert main(["compose-digits", "--out", str(out), "--img-size", "48", "--images", "3"]) == 1
    err = capsys.readouterr().err
    assert f"writing {out}: no space left on the device; free space or choose another location" in err, err
    assert err.count("\n") == 1 and not list(tmp_path.iterdir())  # no temporary folder left


def test_the_composed_folder_has_the_permissions_the_umask_gives(tmp_path):
    """The set is its build folder renamed: one made by tempfile.mkdtemp is the owner's alone (0700); one made by
    mkdir follows the umask, as the folders inside it do."""
    umask = os.umask(0o022)
    try:
        compose_digits(tmp_path / "set", img_size=48, images=2, seed=0)
    finally:
        os.umask(umask)
    assert oct((tmp_path / "set").stat().st_mode & 0o777) == "0o755"


def test_overwrite_keeps_the_old_set_whole_until_the_new_one_has_its_name(tmp_path, monkeypatch):
    """Removing the old set before renaming the new one in, a crash between the two loses both. The old set is renamed
    aside and removed once the new one has the name: a failed rename of the new one gives the old its name back."""
    out = tmp_path / "set"
    compose_digits(out, img_size=48, images=2, seed=0)
    before, replace, failed = _files(out), os.replace, []

    def failing_once_onto_out(src, dst):
        if Path(dst) == out and not failed:  # the new set's rename: a crash there leaves what is on disk then
            failed.append(src)
            raise OSError(5, "Input/output error")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_once_onto_out)
    with pytest.raises(OSError):
        compose_digits(out, img_size=48, images=3, seed=1, overwrite=True)
    assert failed and _files(out) == before and [p.name for p in tmp_path.iterdir()] == ["set"]


def _killed_writes(tmp_path):
    """Beside ``tmp_path/set``: a killed write's whole set (compose.json, written last), a partial one, another set's
    folder and a file of a temporary's name."""
    whole, partial = tmp_path / f".set.tmp-4242-{'0a' * 8}", tmp_path / f".set.tmp-4243-{'0b' * 8}"
    (whole / "images").mkdir(parents=True)
    (whole / "compose.json").write_text("{}")
    (partial / "images" / "train").mkdir(parents=True)
    (tmp_path / f".sets.tmp-4242-{'0a' * 8}").mkdir()  # another set's
    (tmp_path / f".set.tmp-4244-{'0c' * 8}").write_text("")  # no writer of a folder made it
    return whole, partial


def test_holding_the_lock_a_killed_writes_partial_folder_is_removed_and_a_whole_set_kept(tmp_path, caplog):
    """With --out's lock held no other compose-digits writes it, so the hidden folders beside it are killed writes':
    a partial one is removed; one holding a whole set (the set --overwrite was replacing when killed between its two
    renames, or the set replacing it) is kept and named. Another set's folder and a file stay."""
    out = tmp_path / "set"
    whole, partial = _killed_writes(tmp_path)
    with caplog.at_level("WARNING", logger="lomar.data"):
        compose_digits(out, img_size=48, images=2, seed=0)
    assert [r.getMessage() for r in caplog.records] == [
        f"{out}: 1 hidden folder(s) beside it holding a whole set from a compose-digits killed before it renamed it "
        f"in or removed it ({whole.name}): one killed while --overwrite replaced the set holds that set; keep what "
        f"you need (rename it to set) and delete the rest"]
    assert (whole / "compose.json").read_text() == "{}" and (out / "compose.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [whole.name, f".sets.tmp-4242-{'0a' * 8}", f".set.tmp-4244-{'0c' * 8}", "set"])


def test_without_flock_a_killed_writes_folders_are_named_and_kept(tmp_path, monkeypatch, caplog):
    """Where no flock is to be had a hidden folder may be a live writer's (another machine sharing the folder): each
    is named and none removed."""
    monkeypatch.setattr(file_lock, "fcntl", None)  # the system without flock: take_file_lock's ENOSYS
    out = tmp_path / "set"
    whole, partial = _killed_writes(tmp_path)
    with caplog.at_level("WARNING", logger="lomar.data"):
        compose_digits(out, img_size=48, images=2, seed=0)
    assert [r.getMessage() for r in caplog.records] == [
        f"{out}: 2 hidden folder(s) beside it from a compose-digits that did not finish ({whole.name}, "
        f"{partial.name}): one killed while --overwrite replaced the set holds that set, whole; keep what you need "
        f"and delete them once no other compose-digits writes there"]
    assert (whole / "compose.json").read_text() == "{}" and partial.is_dir() and (out / "compose.json").is_file()


def test_a_second_compose_digits_into_the_same_out_is_refused_while_the_first_writes(tmp_path):
    """Two writers of one --out would each replace the other's set: the second is refused at once, naming the
    first, and writes nothing."""
    out = tmp_path / "set"
    holder = file_lock.take_file_lock(tmp_path / ".set.lock")
    try:
        with pytest.raises(UsageError, match=r"set is being written by another compose-digits \(pid \d+ on "):
            compose_digits(out, img_size=48, images=2, seed=0)
    finally:
        holder.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".set.lock"]


def test_overwrite_through_a_link_replaces_the_set_it_points_to(tmp_path):
    """--out a symbolic link to a set: the new set replaces the one it points to, and the link stays a link."""
    real, link = tmp_path / "real", tmp_path / "link"
    compose_digits(real, img_size=48, images=2, seed=0)
    link.symlink_to(real)
    compose_digits(link, img_size=48, images=2, seed=1, overwrite=True)
    assert link.is_symlink() and json.loads((real / "compose.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
