"""The kept check of segmentation pairs: an unchanged pair is not decoded again, a changed file always is, and a
cache file that cannot be trusted is ignored with a warning."""

import json
import os
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from lomar.data import pair_checks, segmentation
from lomar.data.segmentation import SegmentationFolder

STEMS = ("a", "b", "c")


def _annotation(path, top):
    """A 16x16 annotation of ids 1 and ``top``, stored uncompressed: its size in bytes is the same whatever the ids."""
    ids = np.ones((16, 16), dtype=np.uint8)
    ids[0, 0] = top
    Image.fromarray(ids).save(path, compress_level=0)


def _folder(root, tops=(1, 1, 1)):
    for kind in ("images", "annotations"):
        (root / kind / "training").mkdir(parents=True)
    for stem, top in zip(STEMS, tops):
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(root / "images" / "training" / f"{stem}.jpg")
        _annotation(root / "annotations" / "training" / f"{stem}.png", top)
    return root


@pytest.fixture
def decodes(monkeypatch):
    """The annotations the check decodes, in a list; files written in the test count as settled."""
    read, names = segmentation.read_labels, []

    def counted(path):
        names.append(path.name)
        return read(path)

    monkeypatch.setattr(segmentation, "read_labels", counted)
    monkeypatch.setattr(pair_checks, "RACY_S", 0.0)
    return names


def _build(root, num_classes=2):
    return SegmentationFolder(root, "training", num_classes=num_classes, crop=16, workers=1)


def test_a_second_build_decodes_no_unchanged_pair(tmp_path, decodes):
    root = _folder(tmp_path)
    assert len(_build(root)) == 3 and sorted(decodes) == ["a.png", "b.png", "c.png"]
    decodes.clear()
    assert len(_build(root)) == 3 and decodes == []


@pytest.mark.parametrize("how", ["rewritten in place, its mtime put back", "renamed over it, its mtime put back"])
def test_an_annotation_changed_after_a_build_is_checked_again(tmp_path, decodes, how):
    root = _folder(tmp_path)
    _build(root)
    path = root / "annotations" / "training" / "b.png"
    before = os.stat(path)
    if how.startswith("renamed"):
        _annotation(tmp_path / "new.png", 9)
        os.replace(tmp_path / "new.png", path)
    else:
        _annotation(path, 9)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as cp -p, rsync -t and tar x keep it
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    decodes.clear()
    with pytest.raises(ValueError, match=r"annotation .*b\.png holds class id 9, above --num-classes 2"):
        _build(root)
    assert decodes == ["b.png"]


def test_another_num_classes_is_judged_on_the_kept_ids_without_decoding(tmp_path, decodes):
    root = _folder(tmp_path, tops=(1, 7, 3))
    _build(root, num_classes=12)
    decodes.clear()
    with pytest.raises(ValueError, match=r"annotation .*b\.png holds class id 7, above --num-classes 5 .*pass "
                                         r"--num-classes 7"):
        _build(root, num_classes=5)
    with pytest.raises(ValueError, match=r"b\.png holds class id 7, above the ids 0\.\.6 of --num-classes 7 with "
                                         r"--zero-label class"):
        SegmentationFolder(root, "training", num_classes=7, crop=16, workers=1, reduce_zero_label=False)
    assert decodes == []


def test_files_changed_just_before_the_check_are_not_kept(tmp_path, decodes, monkeypatch):
    monkeypatch.setattr(pair_checks, "RACY_S", 3600.0)  # every file of the folder is younger
    root = _folder(tmp_path)
    _build(root)
    decodes.clear()
    _build(root)
    assert sorted(decodes) == ["a.png", "b.png", "c.png"]


def test_a_failing_pair_keeps_the_pairs_that_passed(tmp_path, decodes):
    root = _folder(tmp_path, tops=(1, 9, 1))
    with pytest.raises(ValueError, match="holds class id 9"):
        _build(root)
    _annotation(root / "annotations" / "training" / "b.png", 1)
    decodes.clear()
    _build(root)
    assert decodes == ["b.png"]


def test_every_bad_pair_of_a_split_is_refused_in_one_error_naming_each(tmp_path, decodes):
    """One run finds them all: the first three's reasons in full, the others' images with the count; the good pair
    is kept, so that the next build decodes only the pairs that were bad."""
    for kind in ("images", "annotations"):
        (tmp_path / kind / "training").mkdir(parents=True)
    stems = ("a", "b", "c", "d", "e", "f")
    for stem in stems:
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / "training" / f"{stem}.jpg")
        _annotation(tmp_path / "annotations" / "training" / f"{stem}.png", 1)
    labels = tmp_path / "annotations" / "training"
    Image.fromarray(np.ones((8, 16), dtype=np.uint8)).save(labels / "b.png")  # another size than its image
    (labels / "c.png").write_bytes(b"not a png")
    for stem in ("d", "e", "f"):
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(labels / f"{stem}.png")  # RGB
    with pytest.raises(ValueError) as refused:
        _build(tmp_path)
    message = str(refused.value)
    assert message.startswith("5 of the 6 image/annotation pairs of training cannot be used, each to fix or remove: "
                              f"(1) annotation {labels / 'b.png'} is 16x8 but its image b.jpg is 16x16; "), message
    assert f"(2) annotation {labels / 'c.png'} cannot be read" in message
    assert f"(3) annotation {labels / 'd.png'} is an RGB image" in message
    assert message.endswith("; and 2 more pairs, of images e.jpg, f.jpg"), message
    for stem in ("b", "c", "d", "e", "f"):
        _annotation(labels / f"{stem}.png", 1)
    decodes.clear()
    assert len(_build(tmp_path)) == 6 and sorted(decodes) == ["b.png", "c.png", "d.png", "e.png", "f.png"]


def _kept(root):
    return pair_checks.cache_file(root.resolve(), "training")


@pytest.mark.parametrize("damage", ["not json", "a malformed entry", "a negative id", "no header"])
def test_a_damaged_cache_file_is_ignored_with_a_warning_and_rewritten(tmp_path, decodes, caplog, damage):
    root = _folder(tmp_path)
    _build(root)
    path = _kept(root)
    kept = json.loads(path.read_text())
    if damage == "not json":
        path.write_text(path.read_text()[:-7])
    else:
        if damage == "a malformed entry":
            kept["pairs"]["b.jpg"][1] = "size"
        elif damage == "a negative id":
            kept["pairs"]["b.jpg"][3] = -1
        else:
            del kept["header"]
        path.write_text(json.dumps(kept))
    decodes.clear()
    with caplog.at_level("WARNING", logger="lomar.data"):
        _build(root)
    assert sorted(decodes) == ["a.png", "b.png", "c.png"]
    assert f"{path} cannot be used" in caplog.text or f"{path} is not a segmentation pair check" in caplog.text
    decodes.clear()
    _build(root)
    assert decodes == []


def test_the_cache_of_another_folder_is_not_trusted(tmp_path, decodes, caplog):
    good, bad = _folder(tmp_path / "good"), _folder(tmp_path / "bad", tops=(1, 9, 1))
    _build(good)
    # same names and sizes; its files' inodes and ctimes would not match either, but the header says so first
    _kept(bad).write_bytes(_kept(good).read_bytes())
    with caplog.at_level("WARNING", logger="lomar.data"), pytest.raises(ValueError, match="holds class id 9"):
        _build(bad)
    assert f"holds the check of {(tmp_path / 'good').resolve()} (training), not of" in caplog.text


def test_a_cache_file_others_may_write_is_not_trusted(tmp_path, decodes, caplog):
    root = _folder(tmp_path)
    _build(root)
    _kept(root).chmod(0o664)
    decodes.clear()
    with caplog.at_level("WARNING", logger="lomar.data"):
        _build(root)
    assert len(decodes) == 3 and "not a regular file of this user's that no one else may write" in caplog.text


def test_another_pixel_limit_checks_every_pair_again(tmp_path, decodes, monkeypatch):
    root = _folder(tmp_path)
    _build(root)
    monkeypatch.setenv("LOMAR_MAX_IMAGE_PIXELS", "100")  # under the annotations' 256 pixels
    decodes.clear()
    with pytest.raises(ValueError, match=r"annotation .*\.png cannot be read .*over the limit of 100"):
        _build(root)
    assert decodes


def test_a_cache_folder_that_cannot_be_written_is_said_and_the_build_goes_on(tmp_path, decodes, caplog, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LOMAR_CACHE_DIR", str(tmp_path / "file"))
    root = _folder(tmp_path / "data")
    with caplog.at_level("WARNING", logger="lomar.data"):
        assert len(_build(root)) == 3
    assert "cannot keep the check of the segmentation pairs in" in caplog.text
    assert "set LOMAR_CACHE_DIR to a folder this user may write" in caplog.text


def test_a_user_with_no_home_folder_is_told_and_the_build_goes_on(tmp_path, decodes, caplog, no_home):
    root = _folder(tmp_path)
    with caplog.at_level("WARNING", logger="lomar.data"):
        assert len(_build(root)) == 3
    assert "cannot keep the check of the segmentation pairs (" in caplog.text
    assert "set LOMAR_CACHE_DIR to a folder this user may write" in caplog.text


def test_a_kept_file_unused_for_a_month_is_removed_when_another_is_written(tmp_path, decodes):
    old, used, new = (_folder(tmp_path / name) for name in ("old", "used", "new"))
    _build(old)
    _build(used)
    month_ago = time.time() - pair_checks.UNUSED_S - 60
    for root in (old, used):
        os.utime(_kept(root), (month_ago, month_ago))
    decodes.clear()
    _build(used)  # unchanged, so not written again, but used
    _build(new)
    assert sorted(decodes) == ["a.png", "b.png", "c.png"]  # new's alone
    assert not _kept(old).exists() and _kept(used).exists() and _kept(new).exists()


def test_attributes_cached_by_path_do_not_hide_a_change(tmp_path, decodes, monkeypatch):
    """An NFS client answers a stat from attributes it holds for up to a minute; opening the file makes it ask the
    server (close-to-open). Here a stat that answers from what it saw first stands for that cache."""
    root = _folder(tmp_path)
    _build(root)
    seen, stat = {}, os.stat

    def cached(path, *args, **kwargs):
        return seen.setdefault(str(path), stat(path, *args, **kwargs))

    monkeypatch.setattr(os, "stat", cached)
    for kind in ("images", "annotations"):
        for path in (root / kind / "training").iterdir():
            cached(path)
    _annotation(root / "annotations" / "training" / "b.png", 9)  # rewritten in place, by another machine
    decodes.clear()
    with pytest.raises(ValueError, match=r"b\.png holds class id 9"):
        _build(root)
    assert decodes == ["b.png"]


def test_the_classes_an_annotation_holds_are_kept_with_its_check(tmp_path, decodes):
    root = _folder(tmp_path, tops=(1, 3, 1))  # ids 1 in every annotation, 3 in b's
    assert _build(root, num_classes=3).classes_held == {0, 2}  # id 0 ignored: ids 1..N are classes 0..N-1
    decodes.clear()
    whole = SegmentationFolder(root, "training", num_classes=4, crop=16, workers=1, reduce_zero_label=False)
    assert decodes == [] and whole.classes_held == {1, 3}  # from the kept check, read under --zero-label class


def test_a_cache_file_of_the_format_without_the_ids_held_is_checked_again_without_a_warning(tmp_path, decodes, caplog):
    root = _folder(tmp_path)
    _build(root)
    path = _kept(root)
    kept = json.loads(path.read_text())
    kept["header"]["format"] = 1  # its entries end at the highest class id
    kept["pairs"] = {name: entry[:4] for name, entry in kept["pairs"].items()}
    path.write_text(json.dumps(kept))
    decodes.clear()
    with caplog.at_level("INFO", logger="lomar.data"):
        assert _build(root).classes_held == {0}
    assert sorted(decodes) == ["a.png", "b.png", "c.png"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    assert f"{path}: checked with another format" in caplog.text
    assert len(json.loads(path.read_text())["pairs"]["a.jpg"]) == 5  # rewritten in the format read


def test_a_refusal_of_bad_pairs_keeps_its_pairs_through_a_pickle():
    """A process that hands the error on (a pool's worker, a study cell's) pickles it: its arguments are not its
    message, so a plain ValueError subclass would not unpickle."""
    import pickle

    refused = pair_checks.BadPairs("training", 8, [("a.jpg", "annotation a.png cannot be read"), ("b.jpg", "too big")])
    copy = pickle.loads(pickle.dumps(refused))
    assert (copy.split, copy.total, copy.failed, str(copy)) == (refused.split, 8, refused.failed, str(refused))


def test_a_class_id_above_the_classes_is_refused_with_the_bad_pairs_of_its_split(tmp_path, decodes):
    """Both told in one error, from the one decode of each annotation: the class id the split's own reason, first."""
    root = _folder(tmp_path, tops=(1, 9, 1))
    (labels := root / "annotations" / "training").joinpath("c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError) as refused:
        _build(root)
    message = str(refused.value)
    assert message.startswith(f"annotation {labels / 'b.png'} holds class id 9, above --num-classes 2 "), message
    assert f"; and annotation {labels / 'c.png'} cannot be read" in message and "\n" not in message, message
    assert sorted(decodes) == ["a.png", "b.png", "c.png"]


def test_the_refusal_of_several_splits_names_each_splits_own_reason_first():
    bad = pair_checks.BadPairs("training", 8, [(f"{s}.jpg", f"annotation {s}.png cannot be read") for s in "abc"])
    refusal = str(pair_checks.splits_refusal([
        pair_checks.BadSplit("training", "annotation x.png holds class id 9, above --num-classes 2", bad),
        pair_checks.BadSplit("validation", "/d/images/validation is not a folder")]))
    assert refusal == ("training and validation cannot be used, each to fix. In training (3 of its 8 image/annotation "
                       "pairs bad): (1) annotation x.png holds class id 9, above --num-classes 2 (2) annotation a.png "
                       "cannot be read; and 2 more pairs. In validation: /d/images/validation is not a folder.")
    copy = pickle.loads(pickle.dumps(pair_checks.BadSplit("training", "why", bad)))
    assert (copy.split, copy.reason, copy.pairs.failed, str(copy)) == ("training", "why", bad.failed,
                                                                       "why; and " + str(bad))
