"""knn, linprobe and finetune skip an unreadable image (as pretraining does) instead of crashing."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lomar import VisionTransformer, ViTConfig, export_encoder
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.data.collate import BadDataTracker
from lomar.eval.features import extract_features, knn_loaders


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An exported tiny encoder and a train/val class-folder root with one broken file per split."""
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    export_encoder(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
                   root / "enc")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            folder = root / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (root / "data" / split / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_features_skip_and_count_unreadable_images(setup, tmp_path):
    train, val = knn_loaders(_more_images(setup, tmp_path / "data", 4), img_size=32, batch_size=3, workers=0)
    encoder = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    bad = BadDataTracker(total=len(train.dataset))
    feats, labels = extract_features(encoder, train, bad=bad)
    assert feats.shape == (16, 32) and labels.tolist() == [0] * 8 + [1] * 8
    assert bad.count == 1 and bad.seen == 17 and "broken.png" in next(iter(bad.bad))


@pytest.mark.parametrize("command, extra", [("knn", ["--k", "3"]), ("linprobe", ["--epochs", "2"])])
def test_probe_commands_survive_a_broken_image(setup, tmp_path, capsys, command, extra):
    out, data = tmp_path / "r.json", _more_images(setup, tmp_path / "data", 4)  # 1 broken of 17 and of 13
    assert main([command, str(setup / "enc"), "--data", str(data), "--img-size", "32", "--workers", "0",
                 "--device", "cpu", "--json", str(out), *extra]) == 0
    result = json.loads(out.read_text())  # as a training command's metrics.jsonl records its evaluation's
    assert result["val_images"] == {"scored": 12, "skipped": 1} and result["train_images"] == {"scored": 16,
                                                                                               "skipped": 1}
    assert f"{data / 'val'}: 1 unreadable image(s) skipped, at most 10% of a split" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["knn", "linprobe"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_probe_commands_stop_when_over_a_tenth_of_a_split_is_unreadable(setup, tmp_path, capsys, command, split):
    data = _more_images(setup, tmp_path / "data", 4, splits=[s for s in ("train", "val") if s != split])
    assert main([command, str(setup / "enc"), "--data", str(data), "--img-size", "32", "--workers", "0",
                 "--device", "cpu", "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    total = 9 if split == "train" else 5
    assert f"error: {data / split}: 1 of {total} images (over 10%) could not be used, e.g. " in err
    assert "broken.png" in err and "Traceback" not in err and not (tmp_path / "r.json").exists()


def test_finetune_stops_when_over_a_tenth_of_its_validation_split_is_unreadable(setup, tmp_path, capsys):
    data = _more_images(setup, tmp_path / "data", 4, splits=["train"])  # training 1 of 17, validation 1 of 5
    assert _finetune(setup, data, tmp_path / "ft") == 1
    err = capsys.readouterr().err
    assert f"error: {data / 'val'}: 1 of 5 images (over 10%) could not be used, e.g. " in err  # as knn says it
    assert "broken.png" in err and "Traceback" not in err
    # the epoch it trained is kept: the scoring's data failed, not the training
    assert safe_load(tmp_path / "ft" / "last.pt")["step"] == 4 and not (tmp_path / "ft" / "best.pt").exists()


def _finetune(setup, data, out, *extra) -> int:
    return main(["finetune", "--pretrained", str(setup / "enc"), "--data", str(data), "--img-size", "32",
                 "--batch-size", "4", "--workers", "0", "--out", str(out), "--device", "cpu", "--epochs", "1", *extra])


def _more_images(setup, root, count: int, splits=("train", "val")):
    """A copy of the setup's data with ``count`` more readable images per class in each of ``splits``."""
    import shutil

    shutil.copytree(setup / "data", root)
    rng = np.random.default_rng(1)
    for split in splits:
        for label in ("a", "b"):
            for i in range(count):
                pixels = rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"x{i}.png")
    return root


def test_finetune_survives_a_broken_image(setup, tmp_path, capsys):
    data = _more_images(setup, tmp_path / "data", 4)  # 1 broken of 17 (train), of 13 (val): under 10 %
    assert _finetune(setup, data, tmp_path / "ft") == 0
    assert (tmp_path / "ft" / "last.pt").is_file()
    assert "1 unusable image(s) skipped, e.g. " in capsys.readouterr().out


def test_finetune_with_too_many_broken_images_stops_in_one_line(setup, tmp_path, capsys):
    assert _finetune(setup, setup / "data", tmp_path / "ft") == 1  # 1 broken of the 8 read an epoch
    err = capsys.readouterr().err
    assert "1 image could not be used so far, over 10% of the 8 an epoch reads (2 batch(es) of 4 per process)" in err
    assert "broken.png" in err
    assert "Traceback" not in err


def test_finetune_steps_over_a_batch_without_one_readable_image(setup, tmp_path, monkeypatch):
    import lomar.train.finetune as finetune
    from lomar.data.collate import BadDataTracker

    calls, real = [], finetune.collate_labelled_refill

    def second_batch_unreadable(items):
        calls.append(1)
        return real([(None, label, path) for _, label, path in items] if len(calls) == 2 else items)

    monkeypatch.setattr(finetune, "collate_labelled_refill", second_batch_unreadable)
    monkeypatch.setattr(BadDataTracker, "check", lambda self, threshold=0.1: None)  # a whole batch is the point
    out = tmp_path / "ft"
    assert _finetune(setup, _more_images(setup, tmp_path / "data", 4), out) == 0
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 3  # 4 batches an epoch, one with nothing to learn from


@pytest.mark.parametrize("command", ["knn", "linprobe"])
def test_a_split_without_one_readable_image_is_one_line(setup, tmp_path, capsys, command):
    data = _more_images(setup, tmp_path / "data", 4, splits=["train"])  # training: 1 broken of 17
    for path in (data / "val").rglob("*.png"):
        path.write_bytes(b"junk")
    assert main([command, str(setup / "enc"), "--data", str(data), "--img-size", "32", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"lomar {command}: error: no image in {data / 'val'} could be read (5 tried); "
                                    f"fix or replace them") and "Traceback" not in err


@pytest.mark.parametrize("command", ["knn", "finetune"])
def test_weights_holding_nan_are_one_line_not_a_silent_result(setup, tmp_path, capsys, command):
    torch.manual_seed(0)
    encoder = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    with torch.no_grad():
        encoder.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    export_encoder(encoder, tmp_path / "diverged")
    if command == "knn":
        args = ["knn", str(tmp_path / "diverged"), "--data", str(setup / "data"), "--img-size", "32", "--workers", "0"]
    else:
        args = ["finetune", "--pretrained", str(tmp_path / "diverged"), "--data", str(setup / "data"), "--img-size",
                "32", "--workers", "0", "--out", str(tmp_path / "ft"), "--device", "cpu"]
    assert main(args) == 2
    assert "blocks.1.mlp.fc1.weight holds NaN or infinite values" in capsys.readouterr().err


def test_knn_says_when_k_is_capped_at_the_training_set(setup, tmp_path, capsys):
    out, data = tmp_path / "r.json", _more_images(setup, tmp_path / "data", 4)
    assert main(["knn", str(setup / "enc"), "--data", str(data), "--img-size", "32", "--workers", "0",
                 "--k", "1000", "--json", str(out)]) == 0
    assert "k-NN (k=16, every training image: --k 1000 asks for more," in capsys.readouterr().out
    assert json.loads(out.read_text())["k"] == 16


def test_the_pretraining_knn_monitor_follows_the_same_rule(setup):
    from lomar.errors import UsageError
    from lomar.eval.knn import KnnMonitor

    encoder = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    with pytest.raises(UsageError, match=r"data/train: 1 of 9 images \(over 10%\) could not be used, e\.g\. .*broken"):
        KnnMonitor(setup / "data", img_size=32, batch_size=4, workers=0, k=3)(encoder)
