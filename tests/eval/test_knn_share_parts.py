"""The parts of a shared feature pass that one process can check: a share's loader, the single-process path of
split_features, and gather_rows's blocks (a group of one; tests/eval/test_knn_shared.py runs several processes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from helpers import write_images
from lomar.data.collate import BadDataTracker
from lomar.eval import features, knn_shared
from lomar.eval.features import knn_loaders
from lomar.eval.knn_shared import gather_rows, share_loader, split_features
from lomar.models.vit import VisionTransformer, ViTConfig


def test_a_share_keeps_the_loaders_workers_and_an_empty_one_starts_none():
    loader = DataLoader(list(range(10)), batch_size=4, num_workers=2)  # 3 batches
    shares = [share_loader(loader, rank, 4) for rank in range(4)]  # the first gets none of them
    assert [len(share.dataset) for share in shares] == [0, 4, 4, 2]
    assert [share.num_workers for share in shares] == [0, 2, 2, 2]


def test_one_process_counts_the_unreadable_images_in_the_tracker_it_is_given(tmp_path, monkeypatch):
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(tmp_path / split / label, 6, size=(12, 12))  # 1 of 12 unreadable: within the 10 %
    (tmp_path / "train" / "a" / "img001.png").write_bytes(b"")
    loader = knn_loaders(tmp_path, img_size=16, batch_size=4, workers=0, warn=False)[0]
    encoder = VisionTransformer(ViTConfig(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2))
    bad, shown = BadDataTracker(len(loader.dataset), warn=False), []
    monkeypatch.setattr(features, "progress", lambda items, desc, **kwargs: shown.append(desc) or items)
    feats, labels = split_features(encoder, loader, "cpu", "mean", bad, desc="k-NN train features")
    assert shown == ["k-NN train features"]  # its progress bar says which pass it is
    assert feats.shape == (11, 16) and labels.tolist() == [0] * 5 + [1] * 6
    assert [p.rsplit("/", 2)[-2:] for p in bad.bad] == [["a", "img001.png"]]


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("block_bytes, sizes", [(24, [2, 2, 1]), (1, [1, 1, 1, 1, 1]), (2**28, [5])])
def test_rows_go_in_blocks_of_at_most_block_bytes_and_one_row_at_least(group_of_one, monkeypatch, block_bytes,
                                                                        sizes):
    sent, gather = [], dist.gather

    def recording(block, *args, **kwargs):
        sent.append(len(block))
        return gather(block, *args, **kwargs)

    monkeypatch.setattr(knn_shared.dist, "gather", recording)
    rows = torch.arange(15, dtype=torch.float32).reshape(5, 3)  # 12 bytes a row
    assert torch.equal(gather_rows(rows, [5], "cpu", block_bytes=block_bytes), rows)
    assert sent == sizes


def test_a_group_of_one_shares_the_whole_split_says_its_pass_and_warns_of_nothing_twice(tmp_path, group_of_one,
                                                                                      monkeypatch, caplog):
    for label in ("a", "b"):
        write_images(tmp_path / "train" / label, 6, size=(12, 12))
        write_images(tmp_path / "val" / label, 1, size=(12, 12))
    (tmp_path / "train" / "b" / "img002.png").write_bytes(b"")
    loader = knn_loaders(tmp_path, img_size=16, batch_size=4, workers=0, warn=False)[0]
    encoder = VisionTransformer(ViTConfig(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2))
    alone = split_features(encoder, loader, "cpu", "mean", BadDataTracker(warn=False))
    shown = []
    monkeypatch.setattr(features, "progress", lambda items, desc, **kwargs: shown.append(desc) or items)
    caplog.clear()
    feats, labels = knn_shared.shared_features(encoder, loader, share_loader(loader, 0, 1), "cpu", "k-NN train",
                                               bad=None)
    assert torch.equal(feats, alone[0]) and torch.equal(labels, alone[1])
    assert shown == ["k-NN train"]  # the main process shows the pass
    # the loader warned of the unreadable image as it read it; the gathered count does not warn again
    assert not [r for r in caplog.records if "skipped unreadable image" in r.getMessage()]


def test_an_empty_share_reads_no_features_and_long_labels_as_the_others_send():
    # every process's labels go through one gather: a float block from the empty share would not match theirs
    dataset = [(torch.zeros(3, 16, 16), 0)] * 3
    loader = DataLoader(dataset, batch_size=4)
    encoder = VisionTransformer(ViTConfig(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2))
    feats, labels = features.read_features(encoder, share_loader(loader, 0, 2), "cpu", "mean",
                                           BadDataTracker(warn=False), None)
    assert feats.shape[0] == 0 and labels.shape == (0,) and labels.dtype == torch.long
