"""What a Task being built may know of the checkpoint its run resumes from.

The lifecycle reads that checkpoint before it builds the Task (:func:`lomar.train.divergence.preload`) and calls the
Task's ``load`` on it once the whole run is built. A Task whose ``load`` refuses a checkpoint for what its data holds
(other classes or categories: finetune, detect) calls :func:`load_resumed` in its ``__init__`` to refuse as soon as it
has read them, before what costs most: the model's build, the pretrained weights' read, the images' check; the
lifecycle then does not call that ``load`` again. A Task whose checkpoint saved its encoder's ViTConfig rebuilds its
model from it (:func:`resumed_encoder_config`), without the encoder its run started from.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar

from lomar.models.beit import BEiTConfig
from lomar.models.vit_config import ViTConfig
from lomar.train.encoder_settings import saved_encoder_config

__all__ = ["Building", "building", "load_resumed", "resumed_checkpoint", "resumed_encoder_config", "resume_line"]


@dataclasses.dataclass
class Building:
    """The build of a Task: ``resumed`` (the checkpoint the run resumes from, a dict; None for a new run, or one
    resumed from a sharded folder, which loads into the built model only), and whether the Task's ``load`` ran on
    it (``loaded``)."""

    resumed: dict | None
    loaded: bool = False


_BUILDING: ContextVar[Building | None] = ContextVar("lomar_building", default=None)


@contextlib.contextmanager
def building(resumed: dict | None) -> Iterator[Building]:
    """Within: a Task built may :func:`load_resumed` ``resumed``; the :class:`Building` says whether it did."""
    build = Building(resumed)
    token = _BUILDING.set(build)
    try:
        yield build
    finally:
        _BUILDING.reset(token)


def load_resumed(task) -> None:
    """In a Task's ``__init__``, once it holds what its ``load`` checks: ``task.load`` of the checkpoint its run
    resumes from, now (nothing for a new run). The lifecycle then leaves it out of the run's load: the Task's
    state it checks is set, and the checkpoint is the same dict."""
    build = _BUILDING.get()
    if build is not None and build.resumed is not None:
        task.load(build.resumed)
        build.loaded = True


def resumed_checkpoint() -> dict | None:
    """In a Task's ``__init__``: the checkpoint its run resumes from, None for a new run (or a sharded folder's)."""
    build = _BUILDING.get()
    return None if build is None else build.resumed


def resumed_encoder_config(config) -> ViTConfig | BEiTConfig | None:
    """In a Task's ``__init__``: the ViTConfig of the encoder its run built (a finetuned BEiT's: its BEiTConfig), as
    the checkpoint it resumes from saved it (:func:`~lomar.train.encoder_settings.saved_encoder_config`), with
    ``config.attention`` where the resume changed that run-control setting (the weights fit any; timm's Beit has none);
    None for a new run, or a checkpoint that saved none (its model is then built as the run's start built it, from
    --pretrained)."""
    checkpoint = resumed_checkpoint()
    saved = saved_encoder_config(config.COMMAND, checkpoint)
    if saved is None:
        return None
    if "vocab_size" in saved:
        return BEiTConfig.from_dict(saved)
    encoder = ViTConfig.from_dict(saved)
    settings = checkpoint.get("settings") if isinstance(checkpoint.get("settings"), dict) else {}
    attention = getattr(config, "attention", None)  # segment has none: its encoder's own
    if attention is not None and attention != settings.get("attention", "auto"):
        encoder = dataclasses.replace(encoder, attention=attention)
    return encoder


def resume_line(config) -> str | None:
    """What a Task built for a resume says of its model in place of a load report (whose new head reads as a fresh
    start): rebuilt from the checkpoint, or, where that saved no encoder config (a ViTConfig, a finetuned BEiT's
    BEiTConfig), built as the run's start built it for the checkpoint's weights; None for a new run."""
    checkpoint = resumed_checkpoint()
    if checkpoint is None:
        return None
    at = f"{config.resume_point.path} (step {checkpoint.get('step', '?')})"
    if saved_encoder_config(config.COMMAND, checkpoint) is not None:
        return f"model rebuilt from the run's checkpoint {at}"
    start = f"--pretrained {config.pretrained}" if config.pretrained else f"--model {config.model}"
    return f"model built from {start} as the run started, for the weights of its checkpoint {at}, which keeps no " \
           f"architecture of its own"
