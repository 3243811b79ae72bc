"""What a pretraining method declares (:class:`Method`) and the pieces methods share.

``config`` below is a :class:`lomar.train.config.PretrainConfig`, only read (``prepare`` may set
``config.tokenizer``); ``grid`` is the (rows, cols) patch grid. ``--windows 0`` means one window
of the whole image (:mod:`lomar.models.windows`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lomar.methods import get_method
from lomar.models.blockmask import SMALLEST_BLOCK_GRID
from lomar.models.masking import MaskingPlan, check_window_request, grid_size
from lomar.models.windows import sample_method_plan, window_geometry

__all__ = ["Method", "MethodRuntime", "MAE_RECIPE", "MAE_RECIPE_SOURCE", "RECIPE_KEYS", "method_runtime",
           "plan_masker", "plan_kwargs", "check_windows"]

Masker = Callable[[torch.Generator], dict]
ToKwargs = Callable[[dict, torch.device], dict]


# The pretraining settings a recipe gives (``lomar pretrain`` settings; lr None = blr x batch / 256).
RECIPE_KEYS = ("epochs", "betas", "blr", "lr", "warmup_epochs", "min_lr", "weight_decay", "clip_grad", "crop_scale",
               "color_jitter", "layer_scale_init")
# MAE's pretraining recipe (He et al. 2022, Table 8 / main_pretrain.py), which LoMaR keeps (SPEC §4);
# 400 epochs is main_pretrain.py's default (the paper's runs are 800-1600).
MAE_RECIPE: Mapping[str, Any] = dict(epochs=400, betas=(0.9, 0.95), blr=1.5e-4, lr=None, warmup_epochs=40, min_lr=0.0,
                                     weight_decay=0.05, clip_grad=None, crop_scale=(0.2, 1.0), color_jitter=0.0,
                                     layer_scale_init=None)
MAE_RECIPE_SOURCE = "MAE's pretraining recipe (He et al. 2022, Table 8; main_pretrain.py)"


@dataclass(frozen=True)
class Method:
    """A pretraining method. Adding one = a module in :mod:`lomar.methods` defining ``METHOD``."""

    name: str
    default_mask_ratio: float | None
    default_pos: str
    default_windows: int | None  # for --windows auto; None = the paper's rule (lomar.window_counts.paper_windows)
    validate: Callable[[Any, tuple[int, int]], None]  # ValueError naming the fix
    build: Callable[[Any, Any], torch.nn.Module]  # (config, ViTConfig) -> the training model; no I/O but reads
    masker: Callable[[Any, tuple[int, int]], Masker]  # per-sample draw in the data workers: gen -> {name: tensor}
    forward_kwargs: Callable[[Any, tuple[int, int]], ToKwargs]  # (collated batch, device) -> model(images, **kw)
    # An explicit step before build (e.g. fit BEiT's tokenizer and record it in the config); may write into OUT.
    prepare: Callable[[Any, tuple[int, int]], None] | None = None
    # export(model, out, metadata) writes the encoder for downstream use; None: the ViT encoder (safetensors)
    export: Callable[[torch.nn.Module, Any, dict], None] | None = None
    # figure(model, images, path, seed=, title=) drawn with every checkpoint; None: pixel reconstructions
    figure: Callable[..., Any] | None = None
    # Scalars of the model's output logged with each step's loss (name -> output -> () tensor), not learned from.
    step_metrics: Mapping[str, Callable[[Any], torch.Tensor]] = field(default_factory=dict)
    # What the logged loss measures, the y axis of the run's loss.png.
    loss_name: str = "reconstruction loss"
    # The paper's pretraining recipe (every key of RECIPE_KEYS): the defaults of a new run of this
    # method, under the YAML file and the flags; ``recipe_source`` says where the values come from.
    recipe: Mapping[str, Any] = field(default_factory=lambda: dict(MAE_RECIPE))
    recipe_source: str = MAE_RECIPE_SOURCE
    # The settings that only some methods read (a decoder's, a tokenizer's) which this one reads; a new run of
    # another method refuses them at other than their default (lomar.train.config_checks).
    reads: tuple[str, ...] = ()
    # Why a windowed run of it reads pixels outside its windows, which --decode windows leaves blank (a phrase after
    # "--method NAME"), or (config, patch size) -> that phrase, where it depends on the run (BEiT's tokenizer); None:
    # its encoder inputs and targets are the windows' pixels alone. Read through reads_outside_windows.
    outside_windows: str | Callable[[Any, int], str | None] | None = "is not declared to read only its windows' pixels"
    # The one --pos its model is built with (MAE: fixed sin-cos absolute embeddings); None: any.
    only_pos: str | None = None
    # --layer-scale-init when unset, from the encoder's width (BEiT's recipe: by model size); None: no layer scale.
    layer_scale_by_width: Callable[[int], float] | None = None
    # lr(step, total, warm-up, base lr, min lr) as the paper's code schedules it; None: MAE's (lomar.lr_schedule.lr_at)
    lr_schedule: Callable[..., float] | None = None
    # resume_settings(saved, source, checkpoint, explicit) amends in place the settings ``saved`` a resumed run read
    # from ``source`` (a checkpoint, ``checkpoint`` as read without its weights; or the run's config.yaml, checkpoint
    # None) for the flags given again (``explicit``); -> a note to print, or None; ValueError naming the fix. By
    # default they stay as saved.
    resume_settings: Callable[[dict, str, dict | None, dict], str | None] = lambda *_: None
    # What its run's checkpoints keep to check a resume against, beyond the settings: run_record(model) -> the
    # checkpoint's entries, of the built model (BEiT: its tokenizer's digest, which the settings name by path only);
    # resume_refusal(config, record, checkpoint) -> why the run whose run_record is ``record`` cannot go on from
    # ``checkpoint`` (one saved before the entries were kept has none), or None. By default: nothing kept or refused.
    run_record: Callable[[torch.nn.Module], dict] = lambda model: {}
    resume_refusal: Callable[[Any, dict, dict], str | None] = lambda *_: None

    def reads_outside_windows(self, config, patch_size: int) -> str | None:
        """:attr:`outside_windows` for a windowed run of ``config`` with ``patch_size`` px patches; ValueError naming
        the fix where it cannot tell (an unreadable --tokenizer)."""
        return self.outside_windows(config, patch_size) if callable(self.outside_windows) else self.outside_windows


@dataclass(frozen=True)
class MethodRuntime:
    """What the engine needs per run: the method, the per-sample masker and the batch → kwargs map."""

    method: Method
    masker: Masker
    forward_kwargs: ToKwargs


def method_runtime(config, patch_size: int) -> MethodRuntime:
    method = get_method(config.method)
    grid = grid_size(config.img_size, patch_size)
    return MethodRuntime(method, method.masker(config, grid), method.forward_kwargs(config, grid))


def _placement(config) -> str:
    """The config's window placement; an object without one (not a PretrainConfig) gets the library's
    default, :func:`lomar.models.masking.sample_plan`'s."""
    return getattr(config, "window_placement", "distinct")


def _plan_draw(gen: torch.Generator, grid, window_size, windows, mask_ratio, placement) -> dict:
    plan = sample_method_plan(1, grid, window_size, windows, mask_ratio, gen, placement)
    return {"top_left": plan.top_left[0], "mask": plan.mask[0]}


def plan_masker(config, grid) -> Masker:
    """A masking plan per sample: ``--windows`` K×K windows (0: the whole grid), random masks at
    ``--mask-ratio`` or blockwise ones when it is None."""
    return functools.partial(_plan_draw, grid=grid, window_size=config.window_size, windows=config.windows,
                             mask_ratio=config.mask_ratio, placement=_placement(config))


def plan_kwargs(config, grid) -> ToKwargs:
    """The collated per-sample plans as one :class:`MaskingPlan` on the device: ``model(images, plan=...)``."""
    k, _ = window_geometry(grid, config.window_size, config.windows)

    def to_kwargs(batch: dict, device: torch.device) -> dict:
        # Checked on the host: on the device its checks would wait for the GPU at every step. Copied without
        # blocking, as the images are: a blocking copy to a GPU waits for everything queued before it.
        plan = MaskingPlan(batch["top_left"], batch["mask"], k).checked(grid)
        return {"plan": plan.to(device, non_blocking=True)}

    return to_kwargs


def check_windows(config, grid, ratio: float | None) -> None:
    """The window request fits the grid; ``ratio`` None = blockwise masks (any K >= 3 that fits)."""
    k, n = window_geometry(grid, config.window_size, config.windows)
    check_window_request(grid, k, n, 0.5 if ratio is None else ratio, _placement(config))
    if ratio is None and k < SMALLEST_BLOCK_GRID:
        what, fix = ((f"--window-size {k}", f"--window-size {SMALLEST_BLOCK_GRID} or more") if config.windows else
                     (f"the {k}x{k} patch grid (--windows 0)", "a larger --img-size"))
        raise ValueError(f"{what} is too small for block masking (about 1 draw in 75 of a 2x2 grid masks nothing); "
                         f"use {fix} or set --mask-ratio")
