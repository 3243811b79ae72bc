"""Downstream: pretrained-encoder loading, k-NN, linear probe, finetune (tiny, CPU)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lomar import LoMaR, ViTConfig, export_encoder
from lomar.checkpoint import atomic_save, lomar_to_original, safe_load
from lomar.cli import main
from lomar.config import PretrainConfig
from lomar.evaluate import knn_predict, load_pretrained_encoder, train_linear_probe

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = LoMaR(ViTConfig(**VIT), window_size=3, num_windows=2)
    config = PretrainConfig(model="vit_tiny_patch8", embed_dim=32, depth=2, num_heads=2, img_size=32,
                            window_size=3, windows=2, mask_ratio=0.8, pos="rpe")
    path = tmp_path_factory.mktemp("pre") / "last.pt"
    atomic_save({"model": model.state_dict(), "config": config.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for label, colour in ((0, (200, 30, 30)), (1, (30, 30, 200))):
            d = root / split / f"class{label}"
            d.mkdir(parents=True)
            for i in range(count):
                img = np.clip(np.array(colour) + rng.normal(0, 20, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_knn_on_hand_made_features():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    scores = knn_predict(bank, labels, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), 2, k=3, temperature=0.07)
    assert scores.argmax(1).tolist() == [0, 1]
    # the nearest neighbours carry exponentially more weight than the far one
    assert scores[0, 0] > 100 * scores[0, 1]


def test_linear_probe_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen)
    y = (x[:, 0] > 0).long()
    _, acc = train_linear_probe(x[:150], y[:150], x[150:], y[150:], epochs=20, batch_size=32, lr=0.05)
    assert acc > 0.9


def test_load_pretrained_encoder_from_each_source(pretrained, tmp_path):
    ours = load_pretrained_encoder(pretrained)
    model_state = safe_load(pretrained)["model"]
    assert torch.equal(ours.blocks[0].attn.rpe.table, model_state["encoder.blocks.0.attn.rpe.table"])
    export_encoder(ours, tmp_path / "exp")
    from_dir = load_pretrained_encoder(tmp_path / "exp")
    original = tmp_path / "orig.pth"
    torch.save({"model": lomar_to_original(model_state)}, original)
    from_original = load_pretrained_encoder(original, img_size=32)
    x = torch.randn(1, 3, 32, 32)
    ref = ours.forward_features(x)
    for other in (from_dir, from_original):
        torch.testing.assert_close(other.forward_features(x), ref)
    with_head = load_pretrained_encoder(pretrained, num_classes=5)
    assert with_head(x).shape == (1, 5)


def test_knn_and_linprobe_commands(pretrained, folder, tmp_path, capsys):
    out = tmp_path / "knn.json"
    assert main(["knn", str(pretrained), "--data", str(folder), "--img-size", "32", "--workers", "0",
                 "--k", "3", "--json", str(out)]) == 0
    assert 0 <= json.loads(out.read_text())["knn_top1"] <= 1
    assert main(["linprobe", str(pretrained), "--data", str(folder), "--img-size", "32", "--workers", "0",
                 "--epochs", "5"]) == 0
    assert "linear probe top-1" in capsys.readouterr().out


def test_finetune_two_steps_and_resume(pretrained, folder, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "--pretrained", str(pretrained), "--data", str(folder), "--img-size", "48",
            "--batch-size", "4", "--workers", "0", "--out", str(out), "--epochs", "2", "--device", "cpu"]
    assert main([*args, "--max-steps", "2"]) == 0
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert "top-1" in capsys.readouterr().out
    first = safe_load(out / "last.pt")
    assert first["step"] == 2 and first["num_classes"] == 2
    assert main([*args, "--resume", "auto"]) == 0
    assert safe_load(out / "last.pt")["epoch"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("top1" in r for r in records)


@pytest.mark.parametrize("args, words", [
    (["--data", "/nope"], "is not a folder"),
    ([], "pass --data"),
    (["--data", "X", "--batch-size", "0"], "must be positive"),
])
def test_finetune_bad_flags(pretrained, args, words, capsys):
    assert main(["finetune", "--pretrained", str(pretrained), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
