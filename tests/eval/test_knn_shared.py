"""pretrain --knn-every under torchrun: each process's share of a k-NN split (the gathering and scoring across
processes: tests/cli/test_pretrain_cli.py's torchrun test)."""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import write_images
from lomar import VisionTransformer, ViTConfig
from lomar.data.collate import BadDataTracker
from lomar.eval.features import extract_features, knn_loaders, read_features
from lomar.eval.knn import KnnMonitor
from lomar.eval.knn_shared import batch_share, share_loader


@pytest.mark.parametrize("size, batch", [(1, 4), (11, 4), (12, 4), (300, 128), (5, 128)])
@pytest.mark.parametrize("world", [2, 3, 8])
def test_the_shares_are_whole_batches_in_order_covering_the_split_once(size, batch, world):
    shares = [batch_share(size, batch, rank, world) for rank in range(world)]
    assert [i for share in shares for i in share] == list(range(size))  # no index twice, none left out, in order
    assert all(share.start % batch == 0 for share in shares if share)  # the single process's own batches
    batches = [-(-len(share) // batch) for share in shares]
    assert max(batches) - min(batches) <= 1


def test_the_shares_features_joined_are_the_single_process_features(tmp_path):
    root = tmp_path / "knn"
    for split, label, count in (("train", "a", 5), ("train", "b", 6), ("val", "a", 2), ("val", "b", 3)):
        write_images(root / split / label, count, size=(12, 12))
    (root / "train" / "a" / "img002.png").write_bytes(b"")  # unreadable, in the middle of a batch
    torch.manual_seed(0)
    encoder = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    loader = knn_loaders(root, img_size=32, batch_size=4, workers=0)[0]
    whole, labels = extract_features(encoder, loader)
    for world in (2, 4):  # 11 images, 3 batches: shares of 4 + 7 images, and none + 4 + 4 + 3
        parts = [read_features(encoder, share_loader(loader, rank, world), "cpu", "mean", BadDataTracker(warn=False),
                               None) for rank in range(world)]
        assert [len(y) for _, y in parts] == ([3, 7] if world == 2 else [0, 3, 4, 3])  # the unreadable one left out
        assert torch.equal(torch.cat([f.reshape(len(y), whole.shape[1]) for f, y in parts]), whole)  # bit for bit
        assert torch.equal(torch.cat([y for _, y in parts]), labels)


@pytest.mark.parametrize("local_rank, says", [("0", True), ("1", False)])
def test_under_torchrun_the_first_process_of_a_machine_alone_says_what_the_folders_hold(
        tmp_path, caplog, monkeypatch, local_rank, says):
    # every process lists the k-NN folders: torchrun --nproc-per-node 8 printed each of these warnings 8 times
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(tmp_path / split / label, 1, size=(12, 12))
        write_images(tmp_path / split, 1, size=(12, 12))  # an image outside the class folders: a warning
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    with caplog.at_level("WARNING", logger="lomar.data"):
        monitor = KnnMonitor(tmp_path, img_size=32, batch_size=2, workers=0, rank=int(local_rank), world_size=2)
    said = [r.getMessage() for r in caplog.records if "outside the class folders" in r.getMessage()]
    assert len(said) == (2 if says else 0), said  # train's and val's
    assert [len(loader.dataset) for loader in monitor.loaders] == [2, 2]
    assert not logging.getLogger("lomar.data").filters  # the next warning is said again
