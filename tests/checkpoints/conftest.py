"""``sources``: one tiny LoMaR written in each format lomar reads, for the checkpoint-format tests."""

import pytest
import torch
from format_models import VIT

from lomar import LoMaR, VisionTransformer, export_encoder
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.io import atomic_save
from lomar.checkpoints.keys import lomar_to_original


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same tiny LoMaR as each format lomar reads."""
    root = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    model = LoMaR(VIT, window_size=3, num_windows=2)
    atomic_save(pretrain_checkpoint(model), root / "pretrain.pt")
    atomic_save({"model": lomar_to_original(model.state_dict())}, root / "original.pth")
    classifier = VisionTransformer(VIT, num_classes=3)
    atomic_save(pretrain_checkpoint(classifier), root / "classifier.pt")
    export_encoder(model.encoder, root / "export")
    return model, root
