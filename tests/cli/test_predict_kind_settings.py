"""`lomar predict` refuses a setting of another kind of model than the checkpoint's, given other than its default, in
one line: a segmenter's label maps are the same whatever --score-threshold says, and a user who gave it would take
them as thresholded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import CPU_RUN, detector_file, segmenter_file
from lomar.cli.app import main
from lomar.models.mask_rcnn import ViTMaskRCNN
from lomar.models.segmenter import UperNetSegmenter
from lomar.models.vit import VisionTransformer, ViTConfig

CONFIG = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    detector_file(root / "det.pt", ViTMaskRCNN(VisionTransformer(CONFIG), 3, 64))
    segmenter_file(root / "seg.pt", UperNetSegmenter(VisionTransformer(CONFIG), 3, channels=16, aux_channels=8))
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(root / "a.png")
    return root


@pytest.mark.parametrize("model, flag, value, kind, theirs", [
    ("seg.pt", "--score-threshold", "0.5", "detector", "segmenter"),
    ("seg.pt", "--top-k", "3", "classifier", "segmenter"),
    ("det.pt", "--eval-mode", "whole", "segmenter", "detector"),
    ("det.pt", "--top-k", "3", "classifier", "detector"),
])
def test_a_setting_of_another_kind_of_model_is_refused(files, tmp_path, capsys, model, flag, value, kind, theirs):
    out = tmp_path / "out"
    assert main(["predict", str(files / model), str(files / "a.png"), "--out", str(out), flag, value, *CPU_RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"lomar predict: error: {flag} {value} is a {kind}'s setting; {files / model} is a {theirs}, whose "
                   f"predictions it would not change: drop {flag}")
    assert not out.exists()
