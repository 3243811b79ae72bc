"""A class that validation annotations hold but no training one is never trained on and scores 0 IoU in the mean:
`lomar segment` warns of it once at start-up, naming it, from what the splits' start-up check read (no second read)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lomar.cli.app import main
from lomar.train import segment


class _Built(Exception):
    """What stops the run once its splits are read, before its model."""


def _split(root, split, ids):
    """Two 32x32 pairs of ``split``, their annotations holding ``ids`` (file ids)."""
    for kind in ("images", "annotations"):
        (root / kind / split).mkdir(parents=True, exist_ok=True)
    for n in range(2):
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "images" / split / f"{split}{n}.jpg")
        labels = np.full((32, 32), ids[0], dtype=np.uint8)
        labels[:8, : 8 * len(ids)] = np.repeat(np.array(ids, dtype=np.uint8), 8)
        Image.fromarray(labels).save(root / "annotations" / split / f"{split}{n}.png")


def _started(tmp_path, monkeypatch, capsys, validation_ids) -> str:
    data = tmp_path / "data"
    _split(data, "training", [1, 2])
    _split(data, "validation", validation_ids)

    def built(*args, **kwargs):
        raise _Built

    monkeypatch.setattr(segment, "UperNetSegmenter", built)
    with pytest.raises(_Built):
        main(["segment", "--data", str(data), "--num-classes", "4", "--model", "vit_tiny_patch16", "--img-size", "32",
              "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "run")])
    return capsys.readouterr().err


def test_a_class_only_in_validation_is_warned_of_once(tmp_path, monkeypatch, capsys):
    err = _started(tmp_path, monkeypatch, capsys, [1, 3, 4])
    warned = [line for line in err.splitlines() if "warning" in line]
    assert warned == ["lomar segment: warning: 2 classes in the validation annotations but in no training one (never "
                      "trained on, each scores 0 IoU in the mean), as the annotations number them: 3, 4; add training "
                      "images of them, or check --num-classes and --zero-label"], err


def test_validation_classes_all_trained_on_say_nothing_of_it(tmp_path, monkeypatch, capsys):
    assert "warning" not in _started(tmp_path, monkeypatch, capsys, [2])
