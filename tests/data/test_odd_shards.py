"""Tar shards as real data sets hold them: members named in another encoding or linked, shard folders with brackets
in their name, a named pipe among them, and a truncated gzipped shard."""

import tarfile

import numpy as np
import pytest
from odd_files import _add, _items, _jpeg

from lomar.data.shards import TarShardDataset
from lomar.data.transforms import PretrainTransform


def test_a_shard_member_named_in_another_encoding_is_a_sample_not_a_crash(tmp_path):
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as archive:
        _add(archive, "caf\xe9.jpg", _jpeg())  # the byte 0xE9: not UTF-8, read back with a surrogate
    items = list(TarShardDataset([shard], PretrainTransform(16), shuffle_buffer=1))
    assert len(items) == 1 and items[0]["image"].shape == (3, 16, 16)


def test_linked_shard_members_are_samples_or_skipped_and_counted(tmp_path):
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as archive:  # GNU tar stores a file's second name as a hard link
        _add(archive, "a.jpg", _jpeg())
        _add(archive, "hard.jpg", kind=tarfile.LNKTYPE, link="a.jpg")
        _add(archive, "sym.jpg", kind=tarfile.SYMTYPE, link="a.jpg")
        _add(archive, "out.jpg", kind=tarfile.SYMTYPE, link="/etc/hostname")  # never read outside the shard
        _add(archive, "loop.jpg", kind=tarfile.SYMTYPE, link="loop.jpg")
    dataset = TarShardDataset([shard], PretrainTransform(16), shuffle_buffer=1)
    assert dataset.count_samples() == 5
    items = _items(shard)
    assert sorted(items) == ["a.jpg", "hard.jpg", "loop.jpg", "out.jpg", "sym.jpg"]
    assert all(items[name]["image"] is not None for name in ("a.jpg", "hard.jpg", "sym.jpg"))
    assert items["out.jpg"]["image"] is None and "a link to /etc/hostname, which the shard does not hold" in (
        items["out.jpg"]["why"])
    assert items["loop.jpg"]["image"] is None and "\n" not in items["loop.jpg"]["why"]


def test_shards_in_a_folder_whose_name_holds_brackets_are_found(tmp_path):
    from lomar.data.shards import shard_paths

    folder = tmp_path / "set [v2]"  # glob would read [v2] as one character of v or 2
    folder.mkdir()
    for name in ("s-000.tar", "s-001.tar"):
        with tarfile.open(folder / name, "w") as archive:
            _add(archive, "a.jpg", _jpeg())
    both = [folder / "s-000.tar", folder / "s-001.tar"]
    assert shard_paths(str(folder / "s-000.tar")) == both[:1]
    assert shard_paths(str(folder / "s-{000..001}.tar")) == shard_paths(str(folder / "*.tar")) == both
    with pytest.raises(ValueError, match=r"names 1 shard\(s\) that do not exist, e.g. .*s-002.tar"):
        shard_paths(str(folder / "s-{000..002}.tar"))


def test_a_named_pipe_among_the_shards_is_refused_not_waited_on(tmp_path):
    import os

    from lomar.data.shards import shard_paths

    with tarfile.open(tmp_path / "a.tar", "w") as archive:
        _add(archive, "a.jpg", _jpeg())
    os.mkfifo(tmp_path / "b.tar")  # tarfile.open on it blocked the start-up count for ever
    with pytest.raises(ValueError, match=r"matches .*b.tar, which is not a regular file \(a folder, a named pipe or a "
                                         r"device\); narrow the pattern or remove it"):
        shard_paths(str(tmp_path / "*.tar"))


def test_a_truncated_gzipped_shard_keeps_what_precedes_the_damage(tmp_path):
    # gzip raises EOFError (neither OSError nor TarError) at a cut-off stream: the count, the tokenizer's draw and
    # the loader's readers crashed on it instead of skipping the damage
    whole, shard = tmp_path / "whole.tar.gz", tmp_path / "a.tar.gz"
    rng = np.random.RandomState(0)
    with tarfile.open(whole, "w:gz") as archive:
        for i in range(40):  # noise: gzip cannot shrink it, so the cut falls among the members
            _add(archive, f"{i:02d}.jpg", _jpeg() + rng.bytes(2000))
    shard.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    dataset = TarShardDataset([shard], PretrainTransform(16), shuffle_buffer=1)
    count = dataset.count_samples()
    assert 0 < count < 40 and "damaged after some samples" in dataset.damaged[str(shard)]
    assert len(list(dataset)) in (count - 1, count)  # the count reads headers: the member cut off in its data too
    assert 0 < len(list(TarShardDataset([shard], PretrainTransform(16)).spread(4))) <= 4
