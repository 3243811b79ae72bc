"""The settings of the encoder a training command builds or loads (finetune, detect and segment put a head on it;
pretrain may start from --pretrained): --window-size / --global-blocks, the attention layout a task overrides,
--img-size against a dense task's pyramid, --pretrained and --model. Imports no torch."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from lomar.train import settings as S
from lomar.train.settings import ConfigError

__all__ = ["check_windows", "encoder_layout", "random_encoder_patch", "pretrained_encoder", "check_img_size",
           "check_pretrained", "model_only_without_pretrained", "unused_encoder_flags", "saved_encoder_config",
           "rebuilt_encoder_config", "REBUILT_FROM_CHECKPOINT", "names_recorded_encoder"]

# Where a checkpoint saved before model specs kept the ViTConfig of its run's encoder (finetune: the classifier's own)
_CONFIG_BEFORE_SPECS = {"finetune": "config", "detect": "encoder_config", "segment": "encoder_config"}


def check_windows(config: Any) -> None:
    """--window-size / --global-blocks (the block indices are checked against the depth at load)."""
    if (blocks := config.global_blocks) is None:
        return
    if not config.window_size:
        raise ConfigError("--global-blocks needs --window-size N > 0 (the other blocks attend inside N x N windows); "
                          "add --window-size 14, or drop --global-blocks")
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"--global-blocks must be distinct block indices, got {' '.join(map(str, blocks))}")


def encoder_layout(config: Any) -> dict:
    """The attention settings a task's encoder overrides (none: the pretrained encoder's); global blocks None:
    ViTDet's for the depth."""
    layout = {} if config.attention == "auto" else {"attention": config.attention}
    if config.window_size is not None:
        layout["window_size"] = config.window_size
        layout["global_blocks"] = () if not config.window_size else config.global_blocks  # None: ViTDet's
    return layout


def random_encoder_patch(config: Any) -> int | None:
    """The patch size of the --model a dense task builds without --pretrained (a pretrained one has its own)."""
    return int(config.model.rsplit("patch", 1)[1]) if config.pretrained is None and config.model else None


def pretrained_encoder(pretrained: str) -> tuple[str, int | None]:
    """("beit" or "vit", its patch size or None) of the --pretrained encoder, told from its config or weight shapes
    before its weights or a dense task's data are read (("vit", None) where they cannot tell); ConfigError for a trained
    model that is no encoder (a detector, a segmenter, a linear probe)."""
    from lomar.checkpoints.peek import peek_encoder  # torch: not for --help

    try:
        return peek_encoder(pretrained) or ("vit", None)
    except ValueError as exc:  # peek's refusal of a whole model names the file and what to pass instead
        raise ConfigError(f"--pretrained {pretrained}: {exc}") from None


def check_img_size(config: Any, patch: int | None = None) -> None:
    """--img-size is a multiple of a detection or segmentation pyramid's coarsest stride: twice the encoder's patch
    (the 2x2 max pool of its grid), so that the grid and every level tile the crop exactly. ``patch``: a --pretrained
    encoder's, where its file tells it; else the random --model's; else 16 (32: mmseg's and detectron2's divisor)."""
    source = f"--pretrained {config.pretrained}" if patch else f"--model {config.model}"
    patch = patch or random_encoder_patch(config)
    step = 2 * (patch or 16)
    if config.img_size % step:
        why = f": twice the patch size {patch} of {source}" if patch else ""
        raise ConfigError(f"--img-size must be a multiple of {step} (the coarsest pyramid stride{why}), got "
                          f"{config.img_size}; e.g. {max(step, round(config.img_size / step) * step)}")


def saved_encoder_config(command: str, checkpoint: dict | None) -> dict | None:
    """The config (as a dict) of the encoder a ``lomar COMMAND`` run built (finetune: its classifier), as its
    ``checkpoint`` saved it: its ``model_spec``'s config, else where checkpoints saved before specs kept it; a
    ViTConfig, or for a finetuned BEiT (timm's ``Beit``) the BEiTConfig it was finetuned as (with a ``vocab_size``). A
    resume rebuilds the run's model from it, without the encoder the run started from. None where it saved none: a
    segmenter saved before 2026-12-06."""
    if not isinstance(checkpoint, dict) or command not in _CONFIG_BEFORE_SPECS:
        return None
    spec = checkpoint.get("model_spec")
    saved = spec.get("config") if isinstance(spec, dict) else checkpoint.get(_CONFIG_BEFORE_SPECS[command])
    return saved if isinstance(saved, dict) and "embed_dim" in saved else None


# Why a resume rebuilding its model refuses another --pretrained: the file would be recorded as the run's start
REBUILT_FROM_CHECKPOINT = ", whose model is rebuilt from that checkpoint and reads no --pretrained"


def names_recorded_encoder(given: str | None, recorded: str | None, out: str | None, recorded_out: str | None) -> bool:
    """Whether a resume's --pretrained ``given`` names the file its run recorded (``recorded``): the same file, or
    the same place beside the run's folder (``out``, recorded as ``recorded_out``), where a move of both took it (a
    `lomar study` folder, whose cells' checkpoints feed their own finetune evaluations)."""
    if given is None or recorded is None:
        return False
    with contextlib.suppress(OSError):  # the recorded file moved or deleted: its place beside the folder decides
        if os.path.samefile(given, recorded):
            return True
    return None not in (out, recorded_out) and os.path.relpath(given, out) == os.path.relpath(recorded, recorded_out)


def rebuilt_encoder_config(config: Any) -> dict | None:
    """The encoder's config (as a dict: a ViTConfig, a finetuned BEiT's BEiTConfig) from which a resume of ``config``
    rebuilds its run's model (:func:`saved_encoder_config`), its --pretrained file then not read (it need not exist);
    None for a new run, or one whose checkpoint saved none."""
    point = getattr(config, "resume_point", None)
    return None if point is None else saved_encoder_config(config.COMMAND, point.meta)


def check_pretrained(config: Any, fix: str = "") -> None:
    """--pretrained, when given, exists (``fix``: what to say after), unless a resume rebuilds the model without it."""
    if config.pretrained is not None and not Path(config.pretrained).exists() and not rebuilt_encoder_config(config):
        if config.resume:  # an older checkpoint: its model is built as the encoder builds it, then its weights loaded
            fix = ("; the run being resumed started from it, and its checkpoint keeps no architecture of its own, "
                   "which is read from there again: pass --pretrained with that encoder (a copy, or its export, will "
                   "do: the checkpoint's weights replace its own)")
        raise ConfigError(f"--pretrained {config.pretrained} does not exist{fix}")


def model_only_without_pretrained(config: Any, explicit: dict[str, Any]) -> None:
    """--model names a random encoder's architecture (default vit_base_patch16): with --pretrained, which brings
    its own, a given one would be ignored (an error), and the run records none rather than an unused default."""
    if config.pretrained is None:
        config.model = config.model or S.MODEL.default
    elif explicit.get("model") is not None:
        raise ConfigError(f"--model {explicit['model']} is the architecture of a random encoder, but --pretrained "
                          f"{config.pretrained} brings its own; drop --model (or --pretrained)")


def unused_encoder_flags(config: Any, encoder: Any, beit: bool = False) -> list[str]:
    """The start's notes for --(no-)train-pos-embed, --attention and --(no-)decay-rel-pos-bias given as flags
    (``config.flags_given``) to an ``encoder`` (built, with its head or not; ``beit``: timm's BEiT) that lacks what
    each acts on. Notes, not refusals: a settings file may hold them for any encoder, and a detector or segmenter of
    an older lomar resumes with train_pos_embed false."""
    given, notes = getattr(config, "flags_given", frozenset()), []

    def flag(name: str) -> str:
        return S.as_typed("--" + name.replace("_", "-"), getattr(config, name))

    if "train_pos_embed" in given and getattr(encoder, "pos_embed", None) is None:
        notes.append(f"{flag('train_pos_embed')} is unused: it acts on an absolute position table (MAE's), and this "
                     f"encoder has none")
    blocks = getattr(encoder, "blocks", ())
    if "attention" in given and not any(getattr(block.attn, "rpe", None) is not None
                                        or getattr(block.attn, "rel_pos", "none") != "none" for block in blocks):
        lacking = "timm's BEiT attention computes its own" if beit else "this encoder's attention has none"
        notes.append(f"{flag('attention')} is unused: it picks how lomar computes a relative position bias (iRPE, "
                     f"--rel-pos), and {lacking}")
    if "decay_rel_pos_bias" in given and not beit:
        notes.append(f"{flag('decay_rel_pos_bias')} is unused: it sets a BEiT encoder's finetuning groups, and this "
                     f"encoder is not BEiT's")
    return notes
