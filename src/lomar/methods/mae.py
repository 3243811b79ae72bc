"""MAE: global random masking and an asymmetric encoder-decoder (:class:`lomar.models.mae.MAE`),
or with ``--windows N`` the paper's §4.6 encoder-decoder inside each K×K window
(:class:`lomar.models.mae_window.MAEWindow`)."""

from __future__ import annotations

import functools

import torch

from lomar.methods.base import Method, check_windows, plan_kwargs, plan_masker
from lomar.models.mae import MAE
from lomar.models.mae_window import MAEWindow


def validate(config, grid) -> None:
    # --pos abs (METHOD.only_pos) is required by lomar.train.config before this runs
    if not 0 < config.mask_ratio < 1:
        raise ValueError(f"--mask-ratio must be in (0, 1) for MAE, got {config.mask_ratio}")
    if config.windows:
        check_windows(config, grid, config.mask_ratio)


def build(config, vit) -> MAE:
    decoder = (config.decoder_embed_dim, config.decoder_depth, config.decoder_num_heads)
    if config.windows:
        return MAEWindow(vit, config.window_size, config.windows, config.mask_ratio, *decoder,
                         norm_pix_loss=config.norm_pix_loss)
    return MAE(vit, *decoder, config.mask_ratio, config.norm_pix_loss)


def _noise(gen: torch.Generator, length: int) -> dict:
    return {"noise": torch.rand(length, generator=gen)}


def masker(config, grid):
    if config.windows:
        return plan_masker(config, grid)
    return functools.partial(_noise, length=grid[0] * grid[1])


def forward_kwargs(config, grid):
    if config.windows:
        return plan_kwargs(config, grid)
    # without blocking, as the images: a blocking copy to a GPU waits for everything queued before it
    return lambda batch, device: {"noise": batch["noise"].to(device, non_blocking=True)}


METHOD = Method(
    "mae", default_mask_ratio=0.75, default_pos="abs", default_windows=0,
    validate=validate, build=build, masker=masker, forward_kwargs=forward_kwargs,  # recipe: MAE_RECIPE
    reads=("norm_pix_loss", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"), only_pos="abs",
    outside_windows=None)  # with --windows N: per-window patches in, per-patch (normalised) pixel targets
