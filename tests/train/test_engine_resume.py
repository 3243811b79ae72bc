"""The pretraining engine's sample stream and its exact resume: the sampler's ranks and passes, a resume matching an
uninterrupted run, and tar shards resumed (copied elsewhere, seeded as saved, mid-epoch with the run's worker
count)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import losses, pretrain
from lomar.checkpoints.io import safe_load
from lomar.data.samplers import EpochSampler


def test_sampler_ranks_together_form_the_single_process_batches():
    size, batch = 37, 3
    single = list(EpochSampler(size, seed=5))
    ranks = [list(EpochSampler(size, seed=5, rank=r, world_size=2)) for r in range(2)]
    for b in range(len(ranks[0]) // batch):
        together = {k for r in ranks for k in r[b * batch:(b + 1) * batch]}
        assert together == set(single[b * 2 * batch:(b + 1) * 2 * batch])
    assert not set(ranks[0]) & set(ranks[1])
    assert all(epoch == 0 for _, epoch in single)
    sampler = EpochSampler(size, seed=5)
    sampler.set_epoch(3)
    epoch3 = list(sampler)
    assert epoch3 != single and {e for _, e in epoch3} == {3}
    sampler.set_epoch(3, skip=6)
    assert list(sampler) == epoch3[6:] and len(sampler) == size - 6


def test_one_sampler_pass_runs_through_several_epochs_as_separate_passes_would():
    size, rank, world = 37, 1, 2
    sampler = EpochSampler(size, seed=5, rank=rank, world_size=world)

    def epoch(e, skip=0, first=None):
        sampler.set_epoch(e)
        return list(sampler)[skip:first]

    sampler.set_epoch(2, skip=4, epochs=3, per_epoch=15)  # 18 items a rank an epoch, the first 15 of each
    assert list(sampler) == epoch(2, 4, 15) + epoch(3, 0, 15) + epoch(4, 0, 15)
    sampler.set_epoch(2, skip=4, epochs=3, per_epoch=15)
    assert len(sampler) == 3 * 15 - 4
    for skip, epochs, per_epoch in [(0, 1, 19), (0, 1, 0), (16, 1, 15), (-1, 1, None), (0, 0, None)]:
        with pytest.raises(ValueError, match="does not fit an epoch of 18 items"):
            sampler.set_epoch(0, skip=skip, epochs=epochs, per_epoch=per_epoch)


@pytest.fixture(scope="module")
def image_shard(image_dir, tmp_path_factory) -> Path:
    """The same 16 images as one WebDataset-style tar shard."""
    import tarfile

    path = tmp_path_factory.mktemp("shards") / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for image in sorted(image_dir.iterdir()):
            tar.add(image, arcname=image.name)
    return path


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_exact_resume_matches_an_uninterrupted_run(tmp_path, image_dir, image_shard, kind):
    # 16 images, batch 4: the resume at step 2 is in the middle of epoch 0
    data = str(image_dir if kind == "folder" else image_shard)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert pretrain("--data", data, "--out", str(straight), "--max-steps", "4") == 0
    assert pretrain("--data", data, "--out", str(resumed), "--max-steps", "2") == 0
    assert safe_load(resumed / "last.pt")["step"] == 2
    assert pretrain("--data", data, "--out", str(resumed), "--max-steps", "4", "--resume", "auto") == 0
    a, b = safe_load(straight / "last.pt"), safe_load(resumed / "last.pt")
    assert a["step"] == b["step"] == 4
    assert b.get("shard_seed_root") == ("common" if kind == "tar" else None)  # seeded by names under its folder
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-7)
    assert losses(straight) == losses(resumed)
    assert len(losses(resumed)) == 4


@pytest.fixture(scope="module")
def shard_folders(image_dir, tmp_path_factory) -> Path:
    """The same 16 images as two shards, in SETS/a and SETS/b: returns SETS."""
    import tarfile

    root, images = tmp_path_factory.mktemp("sets"), sorted(image_dir.iterdir())
    for part, name in enumerate("ab"):
        (root / name).mkdir()
        with tarfile.open(root / name / "shard.tar", "w") as tar:
            for image in images[part * 8:part * 8 + 8]:
                tar.add(image, arcname=image.name)
    return root


def test_shards_in_sub_folders_copied_elsewhere_resume_unwarned(tmp_path, shard_folders, capsys):
    """The listing a checkpoint keeps names shards under a folder of their pattern, not under 'SETS/*' (no folder at
    all, for 'SETS/*/shard.tar'): the same shards copied elsewhere resume exactly and are not said to have
    changed."""
    moved = tmp_path / "moved"
    shutil.copytree(shard_folders, moved)
    assert pretrain("--data", f"{shard_folders}/*/shard.tar", "--out", str(tmp_path / "run"), "--max-steps", "1") == 0
    capsys.readouterr()
    assert pretrain("--data", f"{moved}/*/shard.tar", "--out", str(tmp_path / "run"), "--max-steps", "2",
                    "--resume", "auto") == 0
    assert "has changed" not in capsys.readouterr().err and len(losses(tmp_path / "run")) == 2


def test_a_shard_run_saved_seeding_by_path_resumes_so(tmp_path, shard_folders, monkeypatch, capsys):
    """A shard run's checkpoint without shard_seed_root (an older lomar's, whose samples are seeded by path, not by
    their names under the shards' folder) resumes seeding by path, listing the shards under their pattern's folder
    as its checkpoint records them."""
    from lomar.data.shards import TarShardDataset

    made = TarShardDataset.__init__

    def by_path(self, *args, **kwargs):  # the older lomar's seeding: its checkpoints hold no shard_seed_root
        made(self, *args, **kwargs)
        self.seed_root = ""

    monkeypatch.setattr(TarShardDataset, "__init__", by_path)
    straight, resumed, data = tmp_path / "straight", tmp_path / "resumed", f"{shard_folders}/*/shard.tar"
    assert pretrain("--data", data, "--out", str(straight), "--max-steps", "4") == 0
    assert pretrain("--data", data, "--out", str(resumed), "--max-steps", "2") == 0
    assert "shard_seed_root" not in safe_load(resumed / "last.pt")
    monkeypatch.setattr(TarShardDataset, "__init__", made)
    capsys.readouterr()
    assert pretrain("--out", str(resumed), "--max-steps", "4", "--resume", "auto") == 0
    assert "has changed" not in capsys.readouterr().err
    assert losses(resumed) == losses(straight)
    assert "shard_seed_root" not in safe_load(resumed / "last.pt")  # and its later resumes alike


def test_a_folder_run_resumed_on_shards_seeds_them_by_name_under_their_folder(tmp_path, image_dir, image_shard,
                                                                              no_run_figures):
    """A checkpoint without shard_seed_root is a shard run's saved before it, or a run that read no shards: one of a
    folder, resumed on shards (--data may change), seeded them by path ever after, so moved they trained otherwise."""
    out = str(tmp_path / "run")
    assert pretrain("--data", str(image_dir), "--out", out, "--max-steps", "1") == 0
    assert pretrain("--data", str(image_shard), "--out", out, "--max-steps", "2", "--resume", "auto") == 0
    assert safe_load(tmp_path / "run" / "last.pt")["shard_seed_root"] == "common"


def test_a_mid_epoch_resume_on_tar_shards_keeps_the_worker_count(tmp_path, image_shard, capsys):
    """Tar shards are dealt to the loader's workers: resumed in the middle of an epoch with another --workers, the
    run went on with another stream of samples than the uninterrupted run's, without a word."""
    out = tmp_path / "run"
    assert pretrain("--data", str(image_shard), "--out", str(out), "--max-steps", "2") == 0
    capsys.readouterr()
    assert pretrain("--out", str(out), "--max-steps", "4", "--resume", "auto", "--workers", "2") == 2
    assert capsys.readouterr().err.strip().endswith(
        "--workers 2: this run reads tar shards, dealt to 1 loader worker(s) when it stopped in the middle of epoch 0; "
        "another count may repeat or miss samples of that epoch: resume with --workers 1")
    assert safe_load(out / "last.pt")["step"] == 2 and len(losses(out)) == 2
    assert pretrain("--out", str(out), "--max-steps", "4", "--resume", "auto", "--workers", "1") == 0  # 1 reader too
