"""A `lomar detect` or `lomar segment` run folder given where an encoder is read (`lomar export`, `--pretrained`,
`lomar.dense.load_encoder`) is refused as its checkpoint is, in one line: naming that checkpoint as the file to pass
instead sent the user to a second refusal."""

from __future__ import annotations

import pytest

from helpers import detector_file, segmenter_file
from lomar.dense import load_encoder
from lomar.models.mask_rcnn import ViTMaskRCNN
from lomar.models.segmenter import UperNetSegmenter
from lomar.models.vit import VisionTransformer, ViTConfig

CONFIG = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2)


@pytest.mark.parametrize("command", ["detect", "segment"])
def test_a_dense_run_folder_is_refused_as_its_checkpoint(tmp_path, command):
    run = tmp_path / "run"
    run.mkdir()
    if command == "detect":
        detector_file(run / "last.pt", ViTMaskRCNN(VisionTransformer(CONFIG), 3, 64))
    else:
        segmenter_file(run / "last.pt", UperNetSegmenter(VisionTransformer(CONFIG), 3, channels=16, aux_channels=8))
    message = (rf"^checkpoint {run / 'last.pt'} is a whole `lomar {command}` model, not an encoder; pass the encoder "
               r"that run started from \(its --pretrained\), or a pretraining checkpoint or export$")
    for given in (run, run / "last.pt"):
        with pytest.raises(ValueError, match=message):
            load_encoder(given)
