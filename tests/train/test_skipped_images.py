"""Unusable images a run skips (lomar.train.skipped_files via the lifecycle): counted over the whole run, across a
stop and resume and over every rank, and refused past 10 % of an epoch in numbers the user can check."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from toy_run import ToyConfig, ToyTask

from lomar.checkpoints.io import safe_load
from lomar.data.collate import Skipped, collate_pretrain
from lomar.data.folder import build_pretrain_dataset
from lomar.data.samplers import EpochSampler
from lomar.train.lifecycle import run
from lomar.train.pretrain import PretrainTask
from lomar.train.skipped_files import SkippedFiles
from lomar.train.task import TrainingError


class SkippingToy(ToyTask):
    """ToyTask whose points numbered in ``bad`` are unusable files ("img{i}.png"): the run skips and counts them."""

    bad: frozenset = frozenset()

    def __init__(self, config, info, device):
        super().__init__(config, info, device)
        numbered = TensorDataset(*self.data.tensors, torch.arange(len(self.data)))
        sampler = EpochSampler(len(self.data), config.seed, info.rank, info.world_size, keys=False)
        self.train_loader = DataLoader(numbered, config.batch_size, sampler=sampler, drop_last=True)

    def skipped(self, batch):
        return [f"img{i}.png" for i in batch[2].tolist() if i in self.bad]

    def loss(self, batch):
        return super().loss(batch[:2])


def test_skips_are_counted_over_the_whole_run_across_a_stop_and_resume(tmp_path, capsys):
    """A resumed process counted only its own skips: its summary said 1 where the epoch had 3, and 2 + 2 bad files
    (over 10 % of 32 together) went through a stop that an uninterrupted run refuses."""

    class Three(SkippingToy):
        bad = frozenset({12, 3, 0})  # points 12 and 3 come in the epoch's first 2 steps, 0 after (seed 0's order)

    class Four(SkippingToy):
        bad = frozenset({12, 3, 0, 7})

    def last_line():
        return capsys.readouterr().out.rstrip().splitlines()[-1]

    assert run(ToyConfig(out=str(tmp_path / "a"), epochs=1), Three) == 0
    assert ", 3 unusable image(s) skipped, e.g. img" in last_line()
    assert run(ToyConfig(out=str(tmp_path / "b"), epochs=1, max_steps=2), Three) == 0
    assert ", 2 unusable image(s) skipped, e.g. img" in last_line()  # the stop splits them
    assert safe_load(tmp_path / "b" / "last.pt")["skipped_ranks"] == [["img12.png", "img3.png"]]
    assert run(ToyConfig(out=str(tmp_path / "b"), epochs=1, resume="auto"), Three) == 0
    assert ", 3 unusable image(s) skipped, e.g. img" in last_line()
    with pytest.raises(TrainingError, match="^4 images could not be used so far, over 10% of the 32 an epoch"):
        run(ToyConfig(out=str(tmp_path / "c"), epochs=1), Four)
    assert run(ToyConfig(out=str(tmp_path / "d"), epochs=1, max_steps=2), Four) == 0
    with pytest.raises(TrainingError, match="^4 images could not be used so far, over 10% of the 32 an epoch"):
        run(ToyConfig(out=str(tmp_path / "d"), epochs=1, resume="auto"), Four)
    older = SkippedFiles(8, 4, warn=False)
    older.restore(None, 0)  # a checkpoint saved before the skipped files were kept: counted from 0
    assert older.tracker.count == 0 and not older.tracker.bad


def test_a_run_that_skipped_a_detection_or_segmentation_sample_resumes(tmp_path, capsys):
    """coco's and segmentation's datasets name a skipped sample by a Skipped line (a str subclass): saved as one in
    skipped_ranks, the checkpoint loads under torch.load(weights_only=True), and the run resumes."""

    class Lines(SkippingToy):
        bad = frozenset({12, 3, 0})

        def skipped(self, batch):
            return [Skipped(line) for line in super().skipped(batch)]

    assert run(ToyConfig(out=str(tmp_path / "run"), epochs=1, max_steps=2), Lines) == 0
    assert safe_load(tmp_path / "run" / "last.pt")["skipped_ranks"] == [["img12.png", "img3.png"]]
    capsys.readouterr()
    assert run(ToyConfig(out=str(tmp_path / "run"), epochs=1, resume="auto"), Lines) == 0
    assert ", 3 unusable image(s) skipped, e.g. img" in capsys.readouterr().out.rstrip().splitlines()[-1]


def test_too_many_skips_are_told_in_numbers_the_user_can_check(tmp_path):
    """36 points, all unusable, in batches of 4 x accum 2: an epoch reads 32 (the 9th batch is left out). The
    message says 32 is what an epoch reads, and in how many batches: '4 of 32 images' would read as 32 files in the
    data."""

    class AllBad(SkippingToy):
        bad = frozenset(range(36))

        def __init__(self, config, info, device):
            x = torch.randn(36, 3, generator=torch.Generator().manual_seed(2))
            sampler = EpochSampler(36, config.seed, info.rank, info.world_size, keys=False)
            self.train_loader = DataLoader(TensorDataset(x, x.sum(1), torch.arange(36)), config.batch_size,
                                           sampler=sampler, drop_last=True)
            self.model = torch.nn.Linear(3, 1)

    with pytest.raises(TrainingError) as caught:
        run(ToyConfig(out=str(tmp_path / "run")), AllBad)
    message = str(caught.value)
    assert re.fullmatch(r"4 images could not be used so far, over 10% of the 32 an epoch reads \(8 batch\(es\) of "
                        r"4 per process\), e\.g\. img\d+\.png; fix or remove them", message), message


def test_the_last_line_counts_what_every_rank_skipped(tmp_path, capsys, monkeypatch):
    """Under torchrun rank 0's last line counts every rank's skipped files, not its own alone: a file in another
    rank's share is said, as one process says it. The ranks' files reach rank 0 as the checkpoint gathers them (a
    collective: here, rank 1's made up)."""

    monkeypatch.setattr(SkippedFiles, "gathered", lambda self, info: [[], ["b.png", "a.png"], ["a.png"]])
    assert run(ToyConfig(out=str(tmp_path), epochs=1), ToyTask) == 0
    done = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert done.endswith(", 2 unusable image(s) skipped, e.g. b.png")  # a file two ranks read is one file


def test_a_pretraining_runs_skipped_image_is_named_once_with_its_reason(tmp_path):
    """The decoder's error says 'cannot decode image PATH: REASON'; the warning and the done line give the path once,
    then the reason alone: 'PATH (image file is truncated ...)'."""
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(whole, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    dataset = build_pretrain_dataset(str(tmp_path), 16)
    (line,) = PretrainTask.skipped(object.__new__(PretrainTask), collate_pretrain([dataset[(0, 0)]]))
    assert line.count("cut.jpg") == 1 and line.startswith(str(tmp_path / "cut.jpg") + " (") and "truncated" in line


def test_a_pretraining_runs_image_that_cannot_be_read_is_named_once_with_its_reason(tmp_path, monkeypatch):
    """The reader's error (a file over LOMAR_MAX_IMAGE_BYTES) says 'cannot read PATH: REASON': the warning gives the
    path once, then the reason alone."""
    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    monkeypatch.setenv("LOMAR_MAX_IMAGE_BYTES", "100")
    dataset = build_pretrain_dataset(str(tmp_path), 16)
    (line,) = PretrainTask.skipped(object.__new__(PretrainTask), collate_pretrain([dataset[(0, 0)]]))
    assert line.count("big.png") == 1 and line.startswith(f"{path} (") and "over the limit of 100" in line
