"""LoMaR (the paper's method): K×K windows, in-window random masking, an encoder with iRPE
and a linear pixel head (:class:`lomar.models.lomar.LoMaR`). ``--windows 0`` is one window of
the whole grid: a SimMIM-like global baseline."""

from __future__ import annotations

from lomar.methods.base import Method, check_windows, plan_kwargs, plan_masker
from lomar.models.lomar import LoMaR
from lomar.models.masking import grid_size
from lomar.models.windows import window_geometry


def build(config, vit) -> LoMaR:
    k, n = window_geometry(grid_size(vit.img_size, vit.patch_size), config.window_size, config.windows)
    return LoMaR(vit, k, n, config.mask_ratio, config.norm_pix_loss)


METHOD = Method(
    "lomar", default_mask_ratio=0.8, default_pos="rpe", default_windows=None,
    validate=lambda config, grid: check_windows(config, grid, config.mask_ratio),
    build=build, masker=plan_masker, forward_kwargs=plan_kwargs, reads=("norm_pix_loss",), outside_windows=None,
    # recipe: MAE's, the default (SPEC §4: betas 0.9/0.95, blr 1.5e-4, min lr 0, no clipping, crops 0.2-1,
    # no jitter); the paper warms up 20-40 epochs, its longest runs 40.
    recipe_source="LoMaR's pretraining recipe (SPEC §4: the original main_pretrain.py, which keeps MAE's)")
