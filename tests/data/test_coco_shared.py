"""A COCO split under torchrun: the machine's first process packs it into one file (parsing in a forked child), the
others map that file; one process alone parses in a child too and writes nothing."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest

from lomar.data import coco_shared
from lomar.data.coco import CocoInstances, read_coco, training_split
from lomar.data.user_cache import cache_folder
from lomar.errors import UsageError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reader is forked on Linux only")


def _coco(root: Path, images: int = 7, folder: str = "") -> tuple[Path, Path]:
    (root / "images" / folder).mkdir(parents=True)
    data = {"images": [], "annotations": [], "categories": [{"id": 9, "name": "a"}, {"id": 4, "name": "b"}]}
    for i in range(images):
        file_name = os.path.join(folder, f"{i}.jpg")
        (root / "images" / file_name).touch()  # read_coco checks that they are files; nothing here decodes them
        data["images"].append({"id": 10 * i + 1, "file_name": file_name, "width": 16, "height": 12})
        for k in range(i % 3):  # images 0, 3 and 6 have no box: training leaves it out
            data["annotations"].append({"id": 100 * i + k, "image_id": 10 * i + 1, "category_id": (9, 4)[k],
                                        "bbox": [1.0, 2.0, 8.5, 6.0], "iscrowd": int(i == 5 and k == 1),
                                        "segmentation": [[1.0, 2.0, 9.5, 2.0, 9.5, 8.0 + k / 3]]})
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json", root / "images"


@pytest.fixture
def split_files(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMAR_CACHE_DIR", str(tmp_path / "cache"))
    ann, images = _coco(tmp_path / "coco")
    calls = tmp_path / "calls"

    def read():  # counts the parses in a file: the first process's happens in its child
        with open(calls, "a") as log:
            log.write(f"{os.getpid()}\n")
        return training_split(read_coco(ann, images))

    return ann, images, read, lambda: calls.read_text().split() if calls.exists() else []


def _torchrun(monkeypatch, local_rank: int) -> None:
    for key, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("LOCAL_RANK", str(local_rank))):
        monkeypatch.setenv(key, value)


def _targets(split) -> list:
    dataset = CocoInstances(split)
    return [dataset.records[i] for i in range(len(dataset.records))], list(dataset.ids)


def test_the_first_process_packs_once_and_the_others_map_it(split_files, monkeypatch):
    ann, images, read, parses = split_files
    expected = read()
    assert len(parses()) == 1
    _torchrun(monkeypatch, 1)
    monkeypatch.setattr(coco_shared, "WAIT_S", 0.5)
    with pytest.raises(UsageError, match=r"waited 0.5 s for this machine's first process to pack .*ann\.json"):
        coco_shared.shared_split(read, ann, images, "train")  # nothing written yet
    _torchrun(monkeypatch, 0)
    first = coco_shared.shared_split(read, ann, images, "train")
    assert len(parses()) == 2 and parses()[-1] != str(os.getpid())  # parsed in a child, not in this process
    _torchrun(monkeypatch, 1)
    other = coco_shared.shared_split(read, ann, images, "train")
    assert len(parses()) == 2  # mapped, not parsed
    assert _targets(first) == _targets(other) == _targets(expected) and len(first.packed[0]) == 4
    for split in (first, other):
        assert (split.categories, split.names, split.summary) == (expected.categories, expected.names, expected.summary)
    assert [p.name for p in (Path(os.environ["LOMAR_CACHE_DIR"]) / "coco").iterdir()] == [
        coco_shared._identity(ann, images, "train")[0]]  # one file, no temporary left


def test_a_changed_file_is_packed_anew_and_the_evaluating_process_keeps_its_dict(split_files, monkeypatch):
    ann, images, read, parses = split_files
    _torchrun(monkeypatch, 0)
    coco_shared.shared_split(read, ann, images, "train")
    data = json.loads(ann.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 21]
    ann.write_text(json.dumps(data))
    os.utime(ann, ns=(1, 1))  # another size and mtime: the file written for the old one is not read
    name = coco_shared._identity(ann, images, "train")[0]
    dead, live = (Path(os.environ["LOMAR_CACHE_DIR"]) / "coco" / f".{name}.tmp-{pid}" for pid in (999998, 999999))
    dead.write_bytes(b"x" * 100)
    live.write_bytes(b"x")
    os.utime(dead, (1, 1))  # a killed writer's temporary; the live one may be another job's, being written
    whole = coco_shared.shared_split(read, ann, images, "train", keep=True)
    assert len(parses()) == 2 and "annotations" in whole.data and len(whole.packed[0]) == 3
    assert not dead.exists() and live.exists()
    _torchrun(monkeypatch, 1)
    mapped = coco_shared.shared_split(read, ann, images, "train")
    assert len(parses()) == 2 and _targets(mapped) == _targets(read())


def test_the_first_processs_error_is_its_one_line(split_files, monkeypatch, tmp_path):
    ann, images, read, _ = split_files
    ann.write_text('{"images": [')
    _torchrun(monkeypatch, 0)
    with pytest.raises(UsageError, match=r"ann\.json: not valid JSON"):
        coco_shared.shared_split(read, ann, images, "train")


def test_one_process_reads_in_a_child_and_writes_nothing(split_files, monkeypatch, tmp_path):
    ann, images, read, parses = split_files
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    split = coco_shared.shared_split(read, ann, images, "train")  # sent back through a pipe
    assert parses()[-1] != str(os.getpid()) and _targets(split) == _targets(read())
    assert "annotations" in coco_shared.shared_split(read, ann, images, "val", keep=True).data
    assert parses()[-1] == str(os.getpid()) and not (tmp_path / "cache").exists()
    _torchrun(monkeypatch, 0)  # torchrun, but a cache folder that is a link (whose files another may write)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "coco").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("LOMAR_CACHE_DIR", str(tmp_path / "linked"))
    assert _targets(coco_shared.shared_split(read, ann, images, "train")) == _targets(split)
    assert len(parses()) == 4 and not any((tmp_path / "elsewhere").iterdir())


def test_a_user_with_no_home_folder_reads_in_each_process(split_files, monkeypatch, no_home):
    ann, images, read, parses = split_files
    _torchrun(monkeypatch, 0)
    assert _targets(coco_shared.shared_split(read, ann, images, "train")) == _targets(read())
    assert len(parses()) == 2 and parses()[0] != str(os.getpid())  # in a child, as with a folder that is not ours


def test_a_cache_file_others_may_write_is_not_unpickled(split_files, monkeypatch):
    ann, images, read, parses = split_files
    _torchrun(monkeypatch, 0)
    previous = os.umask(0o002)  # a group-writable default, as many systems' users have
    try:
        coco_shared.shared_split(read, ann, images, "train")
    finally:
        os.umask(previous)
    folder = cache_folder("coco")
    path = folder / coco_shared._identity(ann, images, "train")[0]
    assert path.stat().st_mode & 0o077 == 0  # no one else may read or write it
    folder.chmod(0o750)  # a folder the group may enter (not write): accepted as ours
    path.chmod(0o664)  # but a file the group could rewrite with a crafted pickle
    split = coco_shared.shared_split(read, ann, images, "train")
    assert len(parses()) == 2 and _targets(split) == _targets(read())  # parsed again, not read from that file
    assert path.stat().st_mode & 0o077 == 0


def test_another_machines_writer_of_the_same_pid_keeps_its_temporary(split_files, monkeypatch):
    ann, images, read, parses = split_files
    _torchrun(monkeypatch, 0)
    folder = coco_shared._our_folder()
    name = coco_shared._identity(ann, images, "train")[0]
    theirs = folder / f".{name}.tmp-{os.getpid()}"  # being written by a process of this pid on another machine
    theirs.write_bytes(b"partly written")
    whole = coco_shared.shared_split(read, ann, images, "train", keep=True)  # written by this process itself
    assert theirs.read_bytes() == b"partly written"  # neither removed nor renamed into place
    _torchrun(monkeypatch, 1)
    assert _targets(coco_shared.shared_split(read, ann, images, "train")) == _targets(whole)
    assert len(parses()) == 1


def test_a_missing_file_or_folder_is_refused_naming_its_flag(split_files, monkeypatch, tmp_path):
    ann, images, _, _ = split_files
    for local_rank in (0, 1):
        _torchrun(monkeypatch, local_rank)
        for missing_ann, missing_root, flag in ((tmp_path / "no.json", images, "--val-ann"),
                                                (ann, tmp_path / "none", "--val-images")):
            with pytest.raises(UsageError, match=f"^{flag} .* (does not exist|is not a folder); pass "):
                read = functools.partial(read_coco, missing_ann, missing_root, "--val-ann", "--val-images")
                coco_shared.shared_split(read, missing_ann, missing_root, "val", keep=local_rank == 0)


def test_a_process_stopped_while_its_child_reads_does_not_wait_for_the_child(split_files, monkeypatch):
    import multiprocessing
    import signal
    import time

    ann, images, _, _ = split_files

    def slow():
        time.sleep(30)

    def stop(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, stop)  # as lomar's SIGTERM handler raises in the main thread
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            coco_shared.shared_split(slow, ann, images, "train")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not multiprocessing.active_children() and time.monotonic() - start < 10  # at exit it joined the child


def test_a_reader_the_system_killed_is_one_line_with_the_fix(split_files, monkeypatch):
    import signal

    ann, images, _, _ = split_files
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(UsageError, match=r"ended with exit code -9 before packing it; the system kills a process "
                                         r"short of memory: free memory on this machine \(fewer processes"):
        coco_shared.shared_split(lambda: os.kill(os.getpid(), signal.SIGKILL), ann, images, "train")  # the child's


def test_two_jobs_of_other_pixel_limits_keep_their_own_files(split_files, monkeypatch):
    # the file was named by the paths and split alone: job B's first process overwrote job A's file, and A's other
    # processes, waiting for it, found B's identity in it until they gave up (its first one: "cannot be read back")
    ann, images, read, parses = split_files
    monkeypatch.setattr(coco_shared, "WAIT_S", 0.5)
    folder = Path(os.environ["LOMAR_CACHE_DIR"]) / "coco"
    _torchrun(monkeypatch, 0)
    coco_shared.shared_split(read, ann, images, "train")  # job A, the default limit
    a_file = next(folder.glob("*.npy"))
    monkeypatch.setenv("LOMAR_MAX_IMAGE_PIXELS", "1000")
    coco_shared.shared_split(read, ann, images, "train")  # job B, running at the same time
    monkeypatch.delenv("LOMAR_MAX_IMAGE_PIXELS")
    _torchrun(monkeypatch, 1)
    assert _targets(coco_shared.shared_split(read, ann, images, "train")) == _targets(read())  # A's second process
    assert len(parses()) == 3 and len(list(folder.glob("*.npy"))) == 2
    # a file of another identity is removed only once no job can still be waiting to map it
    os.utime(a_file, (1, 1))
    monkeypatch.setenv("LOMAR_MAX_IMAGE_PIXELS", "1000")
    _torchrun(monkeypatch, 0)
    coco_shared.shared_split(read, ann, images, "train")  # B's again: maps its own file, and prunes A's
    assert len(parses()) == 3 and [p.name for p in folder.iterdir()] == [coco_shared._identity(ann, images, "train")[0]]


def test_an_image_deleted_in_a_subfolder_is_not_read_from_the_packed_file(tmp_path, monkeypatch):
    # file_names in a subfolder (Objects365's "patch0/x.jpg"): deleting one changes that folder's mtime alone, and the
    # file packed before, keyed by the image folder's, was mapped as if the image were there
    monkeypatch.setenv("LOMAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(coco_shared, "WAIT_S", 0.5)
    ann, images = _coco(tmp_path / "coco", folder="patch0")
    read = functools.partial(read_coco, ann, images)
    _torchrun(monkeypatch, 0)
    packed = coco_shared.shared_split(read, ann, images, "train")
    _torchrun(monkeypatch, 1)
    assert _targets(coco_shared.shared_split(read, ann, images, "train")) == _targets(packed)  # mapped
    unchanged = os.stat(images).st_mtime_ns
    (images / "patch0" / "4.jpg").unlink()
    assert os.stat(images).st_mtime_ns == unchanged
    with pytest.raises(UsageError, match="waited 0.5 s"):  # the file written for the old folder is not theirs
        coco_shared.shared_split(read, ann, images, "train")
    _torchrun(monkeypatch, 0)
    with pytest.raises(UsageError, match=r"lists 1 image\(s\) not found under .*images, e\.g\. patch0/4\.jpg"):
        coco_shared.shared_split(read, ann, images, "train")  # parsed anew, as for an image deleted at the top


@pytest.mark.parametrize("folder", ["", "patch0"])
def test_an_image_deleted_after_the_parse_is_not_packed_as_fresh(tmp_path, monkeypatch, folder):
    # the folders' times were read after the parse: an image deleted in between left a file keyed by the folder
    # without it, holding the image, which the other processes mapped
    monkeypatch.setenv("LOMAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(coco_shared, "WAIT_S", 0.5)
    ann, images = _coco(tmp_path / "coco", folder=folder)

    def racing_read():
        split = training_split(read_coco(ann, images))
        (images / folder / "4.jpg").unlink(missing_ok=True)
        return split

    _torchrun(monkeypatch, 0)
    for keep in (False, True):
        (images / folder / "4.jpg").touch()
        with pytest.raises(UsageError, match=r"ann\.json or its images under .*images changed while it was read "
                                             r"\((patch0/)?4\.jpg was deleted\); run again once they are settled"):
            coco_shared.shared_split(racing_read, ann, images, "train", keep=keep)
    (images / folder / "4.jpg").touch()

    def rewritten():  # the annotation file rewritten while it is parsed
        split = read_coco(ann, images)
        os.utime(ann, ns=(1, 1))
        return split

    with pytest.raises(UsageError, match=r"\(its size or mtime moved\)"):
        coco_shared.shared_split(rewritten, ann, images, "train")
    _torchrun(monkeypatch, 1)
    with pytest.raises(UsageError, match="waited 0.5 s"):
        coco_shared.shared_split(functools.partial(read_coco, ann, images), ann, images, "train")


@pytest.mark.parametrize("listing", ["other case", "not listable"])
def test_images_a_listing_does_not_name_as_written_are_not_taken_for_deleted(tmp_path, monkeypatch, listing):
    # the writer checked each file_name against its folder's listing alone: a case-insensitive file system lists
    # "4.jpg" for a file_name "4.JPG" (read_coco finds it), and a folder of mode 711 cannot be listed; both were
    # refused as changed while read, on every run
    monkeypatch.setenv("LOMAR_CACHE_DIR", str(tmp_path / "cache"))
    ann, images = _coco(tmp_path / "coco", folder="patch0")
    real = os.listdir

    def listdir(path="."):
        if not str(path).startswith(str(images)):
            return real(path)
        if listing == "not listable":
            raise PermissionError(13, "Permission denied", str(path))
        return [name.upper() for name in real(path)]

    monkeypatch.setattr(os, "listdir", listdir)
    _torchrun(monkeypatch, 0)
    split = coco_shared.shared_split(functools.partial(read_coco, ann, images), ann, images, "train")
    assert len(split.packed[0]) == 7

    def racing_read():  # a name the listing lacks is still refused once it is gone
        split = read_coco(ann, images)
        (images / "patch0" / "4.jpg").unlink()
        return split

    with pytest.raises(UsageError, match=r"\(patch0/4\.jpg was deleted\)"):
        coco_shared.shared_split(racing_read, ann, images, "val")
