"""A figure's model run (the reconstruction a pretraining run draws, an attention map) puts the model in eval mode
and gives it back the mode it had, by an exception too: pretraining prints a failed figure and trains on, which must
be in train mode (drop-path), not left in the figure's eval mode."""

from __future__ import annotations

import pytest
import torch

from lomar.models.lomar import LoMaR
from lomar.models.vit import ViTConfig
from lomar.viz.attention import window_attention
from lomar.viz.reconstruction import reconstruct


def _fails(*args, **kwargs):
    raise RuntimeError("the figure failed")


@pytest.mark.parametrize("draw", ["reconstruction", "attention"])
def test_a_figure_that_raises_leaves_the_model_training(draw):
    model = LoMaR(ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2), window_size=3,
                  num_windows=1).train()
    image = torch.zeros(3, 32, 32)
    with pytest.raises(RuntimeError, match="the figure failed"):
        if draw == "reconstruction":
            model.forward = _fails
            reconstruct(model, image[None])
        else:
            model.encoder.patch_embed.forward = _fails
            window_attention(model, image)
    assert model.training and model.encoder.training and all(m.training for m in model.modules())
