"""Frozen features under torchrun (pretrain --knn-every, lomar knn and linprobe): each process's share of a split
(the gathering and scoring across processes: here for knn and linprobe, tests/cli/test_pretrain_cli_stops.py's
torchrun test for --knn-every)."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import as_torchrun, write_images
from lomar import VisionTransformer, ViTConfig, export_encoder
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.data.collate import BadDataTracker
from lomar.eval import knn_shared
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


def test_linprobe_under_torchrun_shares_the_extraction_and_scores_once_as_one_process(tmp_path):
    # two processes share the extraction, and one scores, prints and writes --json, as the one-process run does;
    # knn's torchrun path is this one's up to its scoring
    root = tmp_path / "toy"
    for split, label, count in (("train", "a", 12), ("train", "b", 12), ("val", "a", 6), ("val", "b", 6)):
        (root / split / label).mkdir(parents=True)
        for i in range(count):  # the classes' brightness ranges overlap: the score is neither a class's share nor 1
            draw = np.random.RandomState(i + 100 * (split == "val") + 1000 * (label == "b"))
            pixels = draw.randint(0, 100) + 60 * (label == "b") + draw.randint(0, 96, (12, 12, 3))
            Image.fromarray(pixels.astype(np.uint8)).save(root / split / label / f"img{i:03d}.png")
    # the first and the last of the 26: in the shares of process 0 (batches 0-2) and 1 (batches 3-6)
    (root / "train" / "a" / "a-broken.png").write_bytes(b"")
    (root / "train" / "b" / "zz-broken.png").write_bytes(b"")
    torch.manual_seed(0)
    export_encoder(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
                   tmp_path / "enc")
    args = ["linprobe", str(tmp_path / "enc"), "--data", str(root), "--batch-size", "4", "--workers", "0",
            "--threads", "1", "--device", "cpu", "--epochs", "3", "--probe-batch-size", "8"]
    out = {n: ["--json", str(tmp_path / f"{n}.json"), "--save", str(tmp_path / f"{n}.pt")] for n in (1, 2)}
    threads = torch.get_num_threads()
    try:  # the one-process result
        assert main([*args, *out[1]]) == 0
    finally:
        torch.set_num_threads(threads)
    ranks = as_torchrun([*args, *out[2]], 2, tmp_path)
    stdout, stderr = ("".join(rank[i] for rank in ranks) for i in (1, 2))
    assert [code for code, _, _ in ranks] == [0, 0], stdout + stderr  # every process exited
    assert stdout.count("top-1") == 1 and stderr.count("loaded ") == 1, stdout + stderr  # said once
    # each process warned of the unreadable image in its share; the note counts both, once
    assert stderr.count("a-broken.png") == stderr.count("zz-broken.png") == 1, stderr
    assert stderr.count("2 unreadable image(s) skipped") == 1, stderr
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in (1, 2))
    assert two == {**one, "linprobe_top1": pytest.approx(one["linprobe_top1"], abs=1e-6)}
    assert 0 < one["linprobe_top1"] < 1 and one["train_images"] == {"scored": 24, "skipped": 2}  # both processes'
    assert one["val_images"] == {"scored": 12, "skipped": 0}
    probes = [safe_load(tmp_path / f"{n}.pt")["probe"] for n in (1, 2)]
    for key, value in probes[0].items():  # its BatchNorm's running statistics are the features': the same features
        torch.testing.assert_close(probes[1][key], value, rtol=0, atol=1e-6, msg=key)
    # the main process wrote the probe on its encoder and the class names, as one process does
    files = [safe_load(tmp_path / f"{n}.pt") for n in (1, 2)]
    assert files[1]["classes"] == ["a", "b"] and files[1]["model_spec"] == files[0]["model_spec"]
    encoder = [k for k in files[0]["model"] if k.startswith("encoder.")]
    assert encoder and all(torch.equal(files[1]["model"][k], files[0]["model"][k]) for k in encoder)


def test_a_process_that_fails_mid_extraction_stops_every_process_with_one_line_each(tmp_path, monkeypatch):
    # its own failure (out of memory) while another waits in the gather: none waits on, and the survivor's line sends
    # to the failed one's error, not to a --resume that knn does not take
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(tmp_path / "data" / split / label, 2, size=(12, 12))
    export_encoder(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)),
                   tmp_path / "enc")
    read = knn_shared.read_features

    def out_of_memory_on_rank_1(*args, **kwargs):
        if os.environ["RANK"] == "1":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return read(*args, **kwargs)

    monkeypatch.setattr(knn_shared, "read_features", out_of_memory_on_rank_1)  # the forked processes' too
    (code, stdout, stderr), (failed, _, its_own) = as_torchrun(
        ["knn", str(tmp_path / "enc"), "--data", str(tmp_path / "data"), "--batch-size", "2", "--workers", "0",
         "--threads", "1", "--device", "cpu"], 2, tmp_path)
    assert failed == 99 and "RuntimeError: CUDA out of memory" in its_own  # not lomar's error: its traceback
    assert (code, stdout) == (1, "") and "Traceback" not in stderr, stderr
    assert re.fullmatch(r"lomar knn: error: rank 0: another process of this run stopped \(connection (closed|reset) by "
                        r"peer\); its own error says why; fix that, then relaunch every process",
                        stderr.splitlines()[-1]), stderr


def test_a_process_group_that_cannot_form_is_one_line(tmp_path, monkeypatch, capsys):
    # torchrun's variables but MASTER_ADDR (a job script's own launch): torch's ValueError is said in one line, as
    # pretrain says it, not as a traceback
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(tmp_path / split / label, 1, size=(12, 12))
    export_encoder(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)),
                   tmp_path / "enc")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    threads = torch.get_num_threads()
    try:
        assert main(["knn", str(tmp_path / "enc"), "--data", str(tmp_path), "--device", "cpu", "--workers", "0"]) == 2
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().err == ("lomar knn: error: --device cpu: Error initializing torch.distributed using "
                                       "env:// rendezvous: environment variable MASTER_ADDR expected, but not set\n")


def test_a_knn_process_whose_share_the_main_one_scores_prints_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from lomar.cli import probe

    monkeypatch.setattr(probe, "_features", lambda args: None)  # what a torchrun process but the main one gets
    json_path = tmp_path / "s.json"
    assert main(["knn", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path), "--json", str(json_path)]) == 0
    assert capsys.readouterr() == ("", "") and not json_path.exists()
