"""A tiny LoMaR (DIM wide, trained STEPS steps) and a state-dict comparison, shared by the FSDP tests."""

from __future__ import annotations

import torch

from lomar.models.lomar import LoMaR
from lomar.models.vit import model_config

DIM, STEPS = 32, 3


def _model() -> LoMaR:
    torch.manual_seed(0)
    return LoMaR(model_config("vit_tiny_patch8", img_size=32, embed_dim=DIM, depth=2, num_heads=2),
                 window_size=3, num_windows=2)


def _assert_close(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        other = got[key]
        if key.endswith("attn.qkv.bias"):  # the key bias: zero gradient, Adam-amplified rounding noise
            value, other = torch.cat([value[:DIM], value[2 * DIM:]]), torch.cat([other[:DIM], other[2 * DIM:]])
        torch.testing.assert_close(other, value, rtol=0, atol=atol, msg=key)
