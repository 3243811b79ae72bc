"""`lomar segment` given bad data or flags: one line naming the file or flag and the fix, images that cannot be
decoded (a run stopped past 10%, a score over part of the validation split said), img-size multiples, and a
detector given as the encoder (refused before the data is read)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from segment_cli import _segment, scoring_task

from lomar.cli.app import main
from lomar.data.compose import compose_digits
from lomar.models.vit import VisionTransformer, ViTConfig


def _bad(root, case):
    """Break a copy of the digits set the way ``case`` says; the file the error must name."""
    labels, images = root / "annotations" / "training", root / "images" / "training"
    first = sorted(labels.glob("*.png"))[0]
    if case == "wrong size":
        Image.fromarray(np.zeros((16, 20), np.uint8)).save(first)
        return first
    if case == "class id above":
        Image.fromarray(np.full((32, 32), 11, np.uint8)).save(first)
        return first
    if case == "corrupt annotation":
        first.write_bytes(b"not a png")
        return first
    if case == "colour annotation":
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(first)
        return first
    if case == "missing annotation":
        first.unlink()
        return images / f"{first.stem}.jpg"
    if case == "missing image":
        (images / f"{first.stem}.jpg").unlink()
        return first
    if case == "empty split":
        shutil.rmtree(root / "images" / "validation")
        (root / "images" / "validation").mkdir()
        return root / "images" / "validation"
    raise AssertionError(case)


@pytest.mark.parametrize("case, fix", [
    ("wrong size", "write the annotation at the image's size"),
    ("class id above", "pass --num-classes 11 or fix the annotation"),
    ("corrupt annotation", "rewrite it as a PNG of class ids"),
    ("colour annotation", "single-channel (mode L or P) PNG"),
    ("missing annotation", "add it or remove the image"),
    ("missing image", "add the image or remove the annotation"),
    ("empty split", "an empty split"),
])
def test_bad_inputs_end_in_one_line_naming_the_file(digits, tmp_path, capsys, case, fix):
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    named = _bad(root, case)
    assert _segment(root, tmp_path / "run", "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("lomar segment: error: ") and err.count("\n") == 1, err
    assert str(named) in err and fix in err, err
    assert not (tmp_path / "run").exists()  # checked before the run folder is made


def test_too_many_images_cut_short_stop_the_run_in_one_line(digits, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    photos = sorted((root / "images" / "training").glob("*.jpg"))
    _cut_short(photos[0])
    assert _segment(root, tmp_path / "run", "--max-steps", "4", "--eval-every", "50") == 1
    err = capsys.readouterr().err
    read = len(photos) // 2 * 2  # a whole number of batches of 2 an epoch
    assert (f"1 image could not be used so far, over 10% of the {read} an epoch reads ({read // 2} batch(es) of 2 per "
            f"process), e.g. cannot decode image {photos[0]}") in err
    assert "Traceback" not in err


def test_too_many_validation_images_cut_short_stop_the_run_and_eval_only_with_exit_1(digits, tmp_path, capsys):
    """Found on its way, after training (as finetune's validation, and a run's training images): exit 1, in one line,
    the run's checkpoint kept; --eval-only of that checkpoint stops alike."""
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    photos = sorted((root / "images" / "validation").glob("*.jpg"))
    _cut_short(photos[0])
    run = tmp_path / "run"
    assert _segment(root, run, "--model", "vit_tiny_patch16", "--max-steps", "1", "--eval-every", "50",
                    "--eval-mode", "whole") == 1
    line = (f"{root / 'images' / 'validation'}: 1 of {len(photos)} images (over 10%) could not be used, e.g. cannot "
            f"decode image {photos[0]}")
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"lomar segment: error: {line}") and "Traceback" not in err
    assert (run / "last.pt").exists()
    assert main(["segment", "--eval-only", "--pretrained", str(run / "last.pt"), "--data", str(root), "--workers", "0",
                 "--threads", "1", "--device", "cpu", "--batch-size", "1", "--out", str(tmp_path / "ev")]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"lomar segment: error: {line}")


def _cut_short(photo: Path) -> None:
    """The header reads (start-up passes), the scan not: skipped with a warning when read."""
    data = photo.read_bytes()
    photo.write_bytes(data[:data.index(b"\xff\xda") + 20])


def test_a_score_over_part_of_the_validation_split_says_so(tmp_path, capsys, monkeypatch):
    """--eval-only's record and result line, and before every epoch line of a run, the images scored and skipped
    (each skipped one is warned of only at its first read); more than 10 % skipped stops in one line."""
    from lomar.train import segment
    from lomar.train.task import TrainingError

    data = tmp_path / "data"
    compose_digits(data, img_size=32, images=20, seed=0, val_fraction=0.5, digit_scale=(0.3, 0.5))
    photos = sorted((data / "images" / "validation").glob("*.jpg"))
    assert len(photos) == 10
    _cut_short(photos[0])
    note = f"{data / 'images' / 'validation'}: 1 unreadable image(s) skipped, at most 10% of a split"
    scoring = scoring_task(data, tmp_path / "ev", run=False)
    monkeypatch.setattr(segment, "SegmentTask", lambda *args: scoring)
    assert segment.evaluate_only(scoring.config) == 0
    monkeypatch.undo()
    record = json.loads((tmp_path / "ev" / "metrics.jsonl").read_text())
    assert record["val_images"] == {"scored": 9, "skipped": 1}
    assert len(list((tmp_path / "ev" / "predictions").glob("*.png"))) == 9
    table = (tmp_path / "ev" / "per_class.md").read_text()
    assert "last evaluation over 9 images (1 unreadable skipped): mIoU " in table
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("lomar segment: mIoU ")
    assert line.endswith(f" over 9 images ({note}); {tmp_path / 'ev' / 'predictions'}")
    task = scoring_task(data, tmp_path / "run", run=True)
    for _ in range(2):  # a run's evaluations: each says it, the epoch line following
        assert task.evaluate()["val_images"] == {"scored": 9, "skipped": 1}
        assert capsys.readouterr().out == note + "\n"
    _cut_short(photos[1])  # 2 of 10: over the 10 % a score may leave out
    with pytest.raises(TrainingError, match=rf"^{data / 'images' / 'validation'}: 2 of 10 images \(over 10%\) could "
                                            rf"not be used, e\.g\. cannot decode image {photos[0]}"):
        task.evaluate()


@pytest.mark.parametrize("flags, message", [
    (["--img-size", "48"], "--img-size must be a multiple of 32"),
    (["--num-classes", "300"], "--num-classes"),
    (["--eval-stride", "40"], "--eval-stride 40 is larger than the --img-size 32 windows it moves"),
    (["--batch-size", "1"], "--batch-size 1: UperNet's BatchNorm needs at least 2 crops per"),
    (["--model", "vit_tiny_patch14"], "--img-size must be a multiple of 28 (the coarsest pyramid stride: twice the "
                                      "patch size 14 of --model vit_tiny_patch14), got 32; e.g. 28"),
])
def test_bad_flags_end_in_one_line(digits, tmp_path, capsys, flags, message):
    assert _segment(digits, tmp_path / "run", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_pretrained_encoders_patch_sets_the_img_size_multiple(digits, tmp_path, capsys):
    # building it named the patch only and suggested 56, a size the next run refused (not a multiple of 32)
    from lomar.checkpoints.export import export_encoder

    encoder = VisionTransformer(ViTConfig(img_size=28, patch_size=14, embed_dim=16, depth=4, num_heads=2))
    export_encoder(encoder, tmp_path / "p14")
    assert _segment(digits, tmp_path / "run", "--pretrained", str(tmp_path / "p14")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--img-size must be a multiple of 28 (the coarsest pyramid stride: twice the " \
        f"patch size 14 of --pretrained {tmp_path / 'p14'}), got 32; e.g. 28" in err, err


def test_a_detector_given_as_the_encoder_is_refused_before_the_data_is_read(tmp_path, capsys):
    """Told from the checkpoint's entries, before the image/annotation pairs are listed and checked (here a folder
    without the ADE20K layout, whose error does not come first)."""
    import torch

    from lomar.checkpoints.kinds import DETECT_FORMAT

    stem = {"backbone.encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}
    torch.save({"format": DETECT_FORMAT, "model": stem}, path := tmp_path / "last.pt")
    (data := tmp_path / "data").mkdir()
    assert _segment(data, out := tmp_path / "run", "--pretrained", str(path)) == 2
    assert capsys.readouterr().err == (f"lomar segment: error: --pretrained {path}: checkpoint {path} is a whole "
                                       f"`lomar detect` model, not an encoder; pass the encoder that run started "
                                       f"from (its --pretrained), or a pretraining checkpoint or export\n")
    assert not out.exists()


def test_bad_pairs_of_both_splits_are_refused_in_one_line_naming_each(digits, tmp_path, capsys):
    """Both splits are checked whole before the refusal, so one run tells what to fix in each: of each, the first two
    reasons in full and the others counted."""
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    named = {}
    for split, count in (("training", 3), ("validation", 1)):
        named[split] = sorted((root / "annotations" / split).glob("*.png"))[:count]
        for label in named[split]:
            label.write_bytes(b"not a png")
    assert _segment(root, tmp_path / "run", "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("lomar segment: error: image/annotation pairs of training and validation cannot be used, "
                          "each to fix or remove. In training, 3 of the ") and err.count("\n") == 1, err
    train, val = err.split(" In validation, 1 of the ")
    assert all(str(label) in train for label in named["training"][:2]) and str(named["training"][2]) not in err, err
    assert train.endswith("; and 1 more pair.") and str(named["validation"][0]) in val, err
    assert not (tmp_path / "run").exists()


def test_a_split_refused_as_a_whole_is_named_with_the_other_splits_problems(digits, tmp_path, capsys):
    """A class id above --num-classes in training (with a bad pair besides) and a validation split without its
    annotations folder: one run names all three."""
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    high, corrupt = sorted((root / "annotations" / "training").glob("*.png"))[:2]
    Image.fromarray(np.full((32, 32), 11, np.uint8)).save(high)
    corrupt.write_bytes(b"not a png")
    shutil.rmtree(root / "annotations" / "validation")
    assert _segment(root, tmp_path / "run", "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("lomar segment: error: training and validation cannot be used, each to fix. In training (1 "
                          "of its ") and err.count("\n") == 1, err
    train, val = err.split(" In validation: ")
    assert f"(1) annotation {high} holds class id 11, above --num-classes 10" in train, err
    assert f"(2) annotation {corrupt} cannot be read" in train, err
    assert val.startswith(f"{root / 'annotations' / 'validation'} is not a folder"), err
    assert not (tmp_path / "run").exists()


def test_a_probe_saved_without_its_encoder_is_refused_before_the_data_is_read(tmp_path, capsys):
    import torch

    torch.save({"probe": {"linear.weight": torch.zeros(2, 8)}, "pool": "mean", "top1": 0.5}, path := tmp_path / "p.pt")
    (data := tmp_path / "data").mkdir()  # without the ADE20K layout, whose error does not come first
    assert _segment(data, out := tmp_path / "run", "--pretrained", str(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lomar segment: error: --pretrained {path}: {path} holds a linear probe without the "
                          "encoder it was trained on") and err.count("\n") == 1, err
    assert not out.exists()
