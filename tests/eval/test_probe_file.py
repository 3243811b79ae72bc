"""`lomar linprobe --save FILE` writes the probe on the frozen encoder it was trained on: `lomar.load_model(FILE)`
rebuilds it into a classifier whose logits are the probe's own on the features linprobe scored, and `lomar predict`
runs it. A file of the probe alone (which names no encoder) is refused in one line naming the fix."""

from __future__ import annotations

import json

import pytest
import torch

from lomar.checkpoints.formats import load_model
from lomar.checkpoints.io import safe_load
from lomar.cli import probe as probe_cli
from lomar.cli.app import main
from lomar.eval.features import knn_loaders
from lomar.models.probe_classifier import LinearProbe, ProbeClassifier


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_a_saved_probe_is_rebuilt_into_the_classifier_linprobe_scored(pretrained, labelled_folder, tmp_path, capsys,
                                                                      monkeypatch, pool):
    fits, fit = [], probe_cli.fit_linprobe
    monkeypatch.setattr(probe_cli, "fit_linprobe", lambda args, features: fits.append((fit(args, features), features))
                        or fits[-1][0])
    saved = tmp_path / "probe.pt"
    assert main(["linprobe", str(pretrained), "--data", str(labelled_folder), "--img-size", "32", "--batch-size", "4",
                 "--workers", "0", "--device", "cpu", "--epochs", "3", "--pool", pool, "--save", str(saved)]) == 0
    ((probe, top1), (_, _, val_x, val_y)), = fits
    with torch.no_grad():
        scored = probe(val_x)  # the probe's evaluation of the val features (its top-1)
    assert top1 == int((scored.argmax(1) == val_y).sum()) / len(val_y)
    model = load_model(saved).eval()
    assert isinstance(model, ProbeClassifier) and (model.num_classes, model.pool) == (2, pool)
    _, val = knn_loaders(labelled_folder / "train", labelled_folder / "val", 32, 4, 0, warn=False)
    with torch.no_grad():
        logits = torch.cat([model(images) for images, *_ in val])
    assert logits.shape == (4, 2) and torch.equal(logits, scored)
    checkpoint = safe_load(saved)
    assert (checkpoint["classes"], checkpoint["top1"], checkpoint["pool"]) == (["a", "b"], top1, pool)
    alone = LinearProbe(val_x.shape[1], 2)  # its probe alone, as a probe file without its encoder holds it
    alone.load_state_dict(checkpoint["probe"])
    with torch.no_grad():
        assert torch.equal(alone.eval()(val_x), scored)
    capsys.readouterr()
    assert main(["predict", str(saved), str(labelled_folder / "val"), "--out", str(tmp_path / "pred"), "--device",
                 "cpu", "--workers", "0"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({top["class"] for top in row["top_k"]} == {"a", "b"} for row in rows)
    # the val images in linprobe's order (class, then file), each read and cropped as linprobe read it
    probabilities = torch.tensor([[next(top["probability"] for top in row["top_k"] if top["class"] == name)
                                   for name in ("a", "b")] for row in rows])
    assert torch.allclose(probabilities, scored.softmax(1), atol=2e-6), (probabilities, scored.softmax(1))
    # no encoder to export or start from: refused in one line naming the one it probed
    for command in (["export", str(saved), "--to", str(tmp_path / "ex")], ["knn", str(saved), "--data",
                                                                           str(labelled_folder)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{saved} is a linear probe on " in err and str(pretrained.resolve()) in err
    # no finetuned classifier for --eval-only to score: refused in one line naming what runs it
    assert main(["finetune", "--eval-only", "--pretrained", str(saved), "--val", str(labelled_folder / "val"), "--out",
                 str(tmp_path / "scored"), "--device", "cpu", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (f"--pretrained {saved} is a `lomar linprobe --save` file, not a `lomar finetune` "
                                     f"run or checkpoint: `lomar predict {saved} IMAGES` runs it on images, and "
                                     f"lomar.load_model rebuilds it in Python\n") in err, err


def test_a_probe_saved_without_its_encoder_is_refused_in_one_line(tmp_path, capsys):
    old, images = tmp_path / "probe.pt", tmp_path / "images"
    images.mkdir()
    torch.save({"probe": LinearProbe(8, 2).state_dict(), "pool": "mean", "top1": 0.5}, old)
    with pytest.raises(ValueError, match=r"holds a linear probe without the encoder it was trained on") as refused:
        load_model(old)
    assert "\n" not in str(refused.value) and "lomar linprobe ENCODER --data DATA --save FILE" in str(refused.value)
    assert main(["predict", str(old), str(images), "--out", str(tmp_path / "pred")]) == 2
    assert capsys.readouterr().err == f"lomar predict: error: {refused.value}\n"


def test_predict_reads_a_probes_images_as_its_linprobe_decode_draft_did(pretrained, tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "photos"
    for split, count in (("train", 2), ("val", 2)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):  # 320 px JPEGs: a draft decode reads them at 1/8, 40 px, for 32 px crops
                seed = torch.Generator().manual_seed(i + 10 * ord(label) + 1000 * len(split))
                pixels = (torch.rand(320, 320, 3, generator=seed) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / label / f"{i}.jpg", quality=90)
    saved = tmp_path / "probe.pt"
    assert main(["linprobe", str(pretrained), "--data", str(root), "--img-size", "32", "--batch-size", "4",
                 "--workers", "0", "--device", "cpu", "--epochs", "2", "--decode", "draft", "--save", str(saved)]) == 0
    assert safe_load(saved)["decode"] == "draft"
    model = load_model(saved).eval()
    assert main(["predict", str(saved), str(root / "val"), "--out", str(tmp_path / "pred"), "--device", "cpu",
                 "--workers", "0"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    predicted = torch.tensor([next(top["probability"] for top in row["top_k"] if top["class"] == "a") for row in rows])
    for decode in ("draft", "full"):
        _, val = knn_loaders(root / "train", root / "val", 32, 4, 0, decode=decode, warn=False)
        with torch.no_grad():
            expected = torch.cat([model(images) for images, *_ in val]).softmax(1)[:, 0]
        if decode == "draft":  # the crops linprobe scored
            assert torch.allclose(predicted, expected, atol=2e-6), (predicted, expected)
        else:  # the whole photo's crops are others
            assert not torch.allclose(predicted, expected, atol=1e-4), (predicted, expected)
