"""The pretraining methods, in one registry: how each is validated, built, masked and called.

A method declares
- its defaults (mask ratio, position encoding, windows per image),
- ``validate(config, grid)``: what it cannot run, as a ValueError naming the fix,
- ``build(config, vit)``: the model, from the pretraining config and its :class:`ViTConfig`,
- ``masker(config, grid)``: what each sample draws in the data workers, ``gen -> {name: tensor}``,
  seeded with the sample's augmentation,
- ``forward_kwargs(config, grid)``: ``(collated batch, device) -> model(images, **kwargs)``.
The model's output has a ``.loss``. Adding a method = one model file + :func:`register`.

``config`` is a :class:`lomar.train.config.PretrainConfig` (only read here). ``--windows 0`` means
one window of the whole image (:mod:`lomar.models.windows`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lomar.models.masking import MaskingPlan, check_window_request, sample_plan
from lomar.models.windows import sample_method_plan, window_geometry

__all__ = ["Method", "MethodRuntime", "METHODS", "register", "get_method", "method_runtime", "variant_name"]

Masker = Callable[[torch.Generator], dict]
ToKwargs = Callable[[dict, torch.device], dict]


@dataclass(frozen=True)
class Method:
    name: str
    default_mask_ratio: float | None
    default_pos: str
    default_windows: int | None  # for --windows auto; None = the paper's rule (lomar.windows.paper_windows)
    validate: Callable[[Any, tuple[int, int]], None]
    build: Callable[[Any, Any], torch.nn.Module]
    masker: Callable[[Any, tuple[int, int]], Masker]
    forward_kwargs: Callable[[Any, tuple[int, int]], ToKwargs]
    export: Callable[[torch.nn.Module, Any, dict], None] | None = None  # None: export_encoder(model.encoder)
    # figure(model, images, path, seed=, title=) drawn with every checkpoint; None: the pixel
    # reconstruction figure (lomar.viz.reconstruction)
    figure: Callable[..., Any] | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"--method {name!r} is unknown; choose one of {', '.join(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class MethodRuntime:
    """What the engine needs per run: the per-sample masker and the batch → kwargs map."""

    method: Method
    masker: Masker
    forward_kwargs: ToKwargs


def method_runtime(config, patch_size: int) -> MethodRuntime:
    from lomar.models.masking import grid_size

    method = get_method(config.method)
    grid = grid_size(config.img_size, patch_size)
    return MethodRuntime(method, method.masker(config, grid), method.forward_kwargs(config, grid))


def variant_name(method: str, windows: int) -> str:
    """The name a run or bench record reports: lomar | lomar_global | mae | mae_window | beit | beit_window."""
    if method == "lomar":
        return "lomar" if windows else "lomar_global"
    return f"{method}_window" if windows else method


# ---- shared pieces -------------------------------------------------------------------------------
def _plan_draw(gen: torch.Generator, grid, window_size, windows, mask_ratio) -> dict:
    plan = sample_method_plan(1, grid, window_size, windows, mask_ratio, gen)
    return {"top_left": plan.top_left[0], "mask": plan.mask[0]}


def _plan_kwargs(config, grid) -> ToKwargs:
    k, _ = window_geometry(grid, config.window_size, config.windows)

    def to_kwargs(batch: dict, device: torch.device) -> dict:
        return {"plan": MaskingPlan(batch["top_left"].to(device), batch["mask"].to(device), k)}

    return to_kwargs


def _check_windows(config, grid, ratio: float | None) -> None:
    k, n = window_geometry(grid, config.window_size, config.windows)
    if ratio is None:  # blockwise masks: any K >= 2 that fits
        check_window_request(grid, k, n, 0.5)
        if k < 2:
            raise ValueError(f"--window-size {k} is too small for block masking; use K >= 2 or set --mask-ratio")
    else:
        check_window_request(grid, k, n, ratio)


# ---- LoMaR ---------------------------------------------------------------------------------------
def _lomar_masker(gen: torch.Generator, grid, window_size, windows, mask_ratio) -> dict:
    plan = sample_plan(1, grid, window_size, windows, mask_ratio, generator=gen)
    return {"top_left": plan.top_left[0], "mask": plan.mask[0]}


def _lomar_build(config, vit):
    from lomar.models.lomar import LoMaR

    k, n = window_geometry(_grid(vit), config.window_size, config.windows)
    return LoMaR(vit, k, n, config.mask_ratio, config.norm_pix_loss)


def _grid(vit) -> tuple[int, int]:
    from lomar.models.masking import grid_size

    return grid_size(vit.img_size, vit.patch_size)


def _lomar_masker_for(config, grid) -> Masker:
    k, n = window_geometry(grid, config.window_size, config.windows)
    return functools.partial(_lomar_masker, grid=grid, window_size=k, windows=n, mask_ratio=config.mask_ratio)


register(Method(
    "lomar", default_mask_ratio=0.8, default_pos="rpe", default_windows=None,
    validate=lambda config, grid: _check_windows(config, grid, config.mask_ratio),
    build=_lomar_build, masker=_lomar_masker_for, forward_kwargs=_plan_kwargs))


# ---- MAE (global, or an encoder-decoder per window) ----------------------------------------------
def _mae_masker(gen: torch.Generator, length: int) -> dict:
    return {"noise": torch.rand(length, generator=gen)}


def _mae_validate(config, grid) -> None:
    # --pos abs is required by lomar.train.config.validate before this runs
    if not 0 < config.mask_ratio < 1:
        raise ValueError(f"--mask-ratio must be in (0, 1) for MAE, got {config.mask_ratio}")
    if config.windows:
        _check_windows(config, grid, config.mask_ratio)


def _mae_build(config, vit):
    from lomar.models.mae import MAE
    from lomar.models.mae_window import MAEWindow

    decoder = (config.decoder_embed_dim, config.decoder_depth, config.decoder_num_heads)
    if config.windows:
        return MAEWindow(vit, config.window_size, config.windows, config.mask_ratio, *decoder,
                         norm_pix_loss=config.norm_pix_loss)
    return MAE(vit, *decoder, config.mask_ratio, config.norm_pix_loss)


def _mae_masker_for(config, grid) -> Masker:
    if config.windows:
        return functools.partial(_plan_draw, grid=grid, window_size=config.window_size, windows=config.windows,
                                 mask_ratio=config.mask_ratio)
    return functools.partial(_mae_masker, length=grid[0] * grid[1])


def _mae_kwargs(config, grid) -> ToKwargs:
    if config.windows:
        return _plan_kwargs(config, grid)
    return lambda batch, device: {"noise": batch["noise"].to(device)}


register(Method(
    "mae", default_mask_ratio=0.75, default_pos="abs", default_windows=0,
    validate=_mae_validate, build=_mae_build, masker=_mae_masker_for, forward_kwargs=_mae_kwargs))


# ---- BEiT (global, or per window: Table 5) -------------------------------------------------------
def _beit_validate(config, grid) -> None:
    _check_windows(config, grid, config.mask_ratio)
    if config.knn_every:
        raise ValueError("--knn-every is not available for --method beit yet; drop it and run "
                         "`lomar knn` on the exported encoder")


def _beit_build(config, vit):
    from lomar.models.beit import BEiTConfig
    from lomar.models.beit_pretrain import BEiTPretrain
    from lomar.train.tokenizer_setup import resolve_tokenizer

    tokenizer = resolve_tokenizer(config, _grid(vit))
    beit = BEiTConfig(img_size=vit.img_size, patch_size=vit.patch_size, in_chans=vit.in_chans,
                      embed_dim=vit.embed_dim, depth=vit.depth, num_heads=vit.num_heads, mlp_ratio=vit.mlp_ratio,
                      vocab_size=tokenizer.vocab_size)
    return BEiTPretrain(beit, tokenizer, config.window_size, config.windows, config.mask_ratio)


def _beit_figure(model, images, path, seed: int = 0, title: str | None = None):
    from lomar.viz.tokens import token_figure

    return token_figure(model, images, path, seed=seed, title=title)


def _beit_export(model, out, metadata: dict) -> None:
    from lomar.checkpoints.export_beit import export_beit_encoder

    export_beit_encoder(model.beit, out, metadata=metadata)


register(Method(
    "beit", default_mask_ratio=None, default_pos="none", default_windows=0,
    validate=_beit_validate, build=_beit_build,
    masker=lambda config, grid: functools.partial(_plan_draw, grid=grid, window_size=config.window_size,
                                                  windows=config.windows, mask_ratio=config.mask_ratio),
    forward_kwargs=_plan_kwargs, export=_beit_export, figure=_beit_figure))
