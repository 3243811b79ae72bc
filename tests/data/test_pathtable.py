"""Dataset path lists at ImageNet scale: packed so that forked loader workers share them, listed in Path order."""

import gc
import os
import sys
from pathlib import Path

import pytest
import torch

from lomar.data.folder import ImageListDataset, LabelledImageFolder, build_image_list
from lomar.data.pathtable import PathTable, sort_like_paths
from lomar.data.transforms import PretrainTransform


def _private_mib() -> float:
    fields = dict(line.split()[:2] for line in open("/proc/self/smaps_rollup") if line.rstrip().endswith("kB"))
    return (int(fields["Private_Clean:"]) + int(fields["Private_Dirty:"])) / 1024


def _growth_in_fork(read, indices) -> float:
    """MiB of private memory a forked child (as a loader worker is) gains reading ``read(i)`` for ``indices``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            gc.disable()  # a collection writes to every tracked object of the process: the test's, not the dataset's
            read(0)  # the loop's own first allocations are not the dataset's
            before = _private_mib()
            for i in indices:
                read(i)
            os.write(w, f"{_private_mib() - before:.3f}".encode())
        except BaseException as exc:  # noqa: BLE001 - said in the parent's failure, not lost with the child
            os.write(w, f"the forked child failed: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as pipe:
        said = pipe.read()
    os.waitpid(pid, 0)
    assert said.replace(".", "", 1).lstrip("-").isdigit(), said or "the forked child died without a word"
    return float(said)


def _copied_by_reading(read, count: int) -> float:
    """MiB a forked child gains reading items 0..count-1, beyond reading item 0 as many times: what the items'
    own pages cost, without the allocator's churn (Pillow's, after other tests: 3 MiB either way)."""
    return _growth_in_fork(read, range(count)) - _growth_in_fork(read, [0] * count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps_rollup")
def test_forked_workers_do_not_copy_the_path_lists(tmp_path, monkeypatch):
    # 10,000 paths: a list of Path objects (and of (Path, label) tuples) that a worker writes to, a refcount per
    # item, and so copies: it grew 4.0 (5.2) MiB here, 572 (652) MiB over ImageNet's 1.28M; the packed table: 0.1 (0.5)
    count = 10_000
    source = tmp_path / "one.jpg"
    source.write_bytes(b"")
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(count // 2):
            os.link(source, tmp_path / label / f"n01440764_{i:08d}.JPEG")
    source.unlink()
    images = ImageListDataset(build_image_list(tmp_path), PretrainTransform(16))
    assert _copied_by_reading(images.sample, count) < 1.5
    monkeypatch.setattr("lomar.data.folder.load_image", lambda path: torch.zeros(3, 2, 2, dtype=torch.uint8))
    labelled = LabelledImageFolder(tmp_path)
    assert _copied_by_reading(labelled.__getitem__, count) < 1.5
    assert labelled.targets[0] == 0 and labelled.targets[-1] == 1 and len(labelled.samples) == count


def test_paths_sort_as_path_objects_do():
    names = ["a/b.jpg", "a-c.jpg", "a.jpg", "a0/x.jpg", "a/b/c.jpg", "a/b.jpg", "A.jpg", "a b.jpg", "a/a-b/x.jpg",
             "a/a/x.jpg", "é.jpg", "e\u0301.jpg", "z.jpg"]
    assert [Path(p) for p in sort_like_paths(names)] == sorted(set(map(Path, names)))


def test_path_table_is_a_sequence_of_paths():
    odd = os.fsdecode(b"bad-\xff.jpg")  # not UTF-8: kept byte for byte
    table = PathTable(["x/a.jpg", Path("y/b.png"), odd])
    assert len(table) == 3 and list(table) == [Path("x/a.jpg"), Path("y/b.png"), Path(odd)]
    assert table[-1] == Path(odd) and table.text(1) == "y/b.png" and os.fsencode(table.text(2)) == b"bad-\xff.jpg"
    assert list(table[1:]) == [Path("y/b.png"), Path(odd)] and len(table[5:]) == 0
    with pytest.raises(IndexError):
        table.text(3)
    assert len(PathTable()) == 0 and not PathTable()
