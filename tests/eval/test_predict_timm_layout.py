"""lomar predict's reading of a timm ViT in a layout lomar's keys lack (tests/checkpoints/test_timm_layout.py): a
classifier is run as timm runs it, a head-less one refused as the encoder it is."""

from __future__ import annotations

import pytest
import timm
import torch

from lomar.errors import UsageError
from lomar.eval.predict import load_trained

MINI = dict(embed_dim=128, depth=4, num_heads=4, patch_size=8, img_size=32)  # heads told by the width and depth


def _save(tmp_path, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, init_values=1e-5, **MINI, **kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.1, 0.3)
    torch.save(model.state_dict(), path := tmp_path / "deit3.pth")
    return model, path


def test_a_timm_classifier_with_layer_scale_is_predicted_with_timms_logits(tmp_path):
    model, path = _save(tmp_path, num_classes=5, global_pool="token")
    images = torch.randn(2, 3, 32, 32)
    trained = load_trained(path)
    with torch.no_grad():
        torch.testing.assert_close(trained.model(images), model(images), atol=1e-5, rtol=0)


def test_a_headless_timm_vit_with_layer_scale_is_refused_as_an_encoder(tmp_path):
    _, path = _save(tmp_path, num_classes=0)
    with pytest.raises(UsageError, match=rf"^{path} is an encoder without a classifier's head, which predicts no "
                                         rf"labels; pass a probe on it"):
        load_trained(path)
