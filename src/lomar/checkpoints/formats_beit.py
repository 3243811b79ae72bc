"""BEiT checkpoints for the downstream commands: our pretraining ``last.pt``, a BEiT export folder,
an original BEiT pretraining checkpoint.

Each reader gives the full pretraining :class:`~lomar.models.beit.BEiT` (:meth:`Reader.model`, for
``lomar export``) and, for finetuning and probes, :meth:`BEiTReader.timm_weights`: the encoder in
timm's ``Beit`` layout with the relative position bias per block, each block's table initialised
from the shared pretraining one (BEiT's finetuning recipe), mask token and ``lm_head`` dropped.
The readers are registered in :mod:`lomar.checkpoints.formats`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.models.beit import Beit, checkpoint_filter_fn
from torch import nn

from lomar.checkpoints.export_beit import CONFIG_NAME, timm_beit_args
from lomar.checkpoints.keys_beit import beit_to_timm, load_original_beit
from lomar.checkpoints.reader import EncoderWeights, Reader, Source, build_strict, pretrain_spec, register
from lomar.models.beit import BEiT, BEiTConfig

__all__ = ["BEiTReader", "BEiTPretrainReader", "BEiTExportReader", "OriginalBEiTReader", "BEiTFinetuneReader",
           "TimmBeitWeights",
           "build_timm_beit"]


@dataclass
class TimmBeitWeights:
    """A BEiT encoder as timm ``Beit(**timm_args)`` (no classifier) and its state dict under timm keys."""

    config: object  # lomar.models.beit.BEiTConfig of the pretraining model
    timm_args: dict
    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)  # source keys the encoder does not use
    source: str = ""


class BEiTReader(Reader):
    """A BEiT format: subclasses give :meth:`model` (our :class:`BEiT`, weights loaded)."""

    source = ""  # what :class:`TimmBeitWeights` names as its source

    def timm_weights(self, src: Source, overrides: dict) -> TimmBeitWeights:
        beit = self.model(src, overrides)
        state = beit.state_dict()
        timm_state = beit_to_timm(state, per_block=True)
        dropped = sorted(k for k in state if k.startswith(("lm_head.", "mask_token")))
        return TimmBeitWeights(beit.config, timm_beit_args(beit), timm_state, dropped, self.source)

    def encoder(self, src: Source, overrides: dict) -> EncoderWeights:
        raise ValueError(f"{src.path} holds a BEiT encoder, which has no VisionTransformer form; load it with "
                         f"lomar.eval.features.load_pretrained_encoder (a timm Beit)")


class BEiTPretrainReader(BEiTReader):
    """Ours: ``lomar pretrain --method beit`` output, ``{"model": BEiTPretrain state ('beit.*'), "config"}``."""

    name, source = "lomar-pretrain-beit", "pretrain checkpoint (beit)"

    def detect(self, data, state):
        config = data.get("config")
        return isinstance(config, dict) and config.get("method") == "beit" and any(k.startswith("beit.") for k in state)

    def model(self, src, overrides):
        if "beit.lm_head.weight" not in src.state:
            raise ValueError(f"{src.path}: BEiT checkpoint without beit.lm_head.weight; it is incomplete")
        return build_strict(pretrain_spec(src), src.state, src.path)


class BEiTExportReader(BEiTReader):
    """A folder from ``lomar export`` / ``lomar pretrain --method beit``: config.json ("method": "beit")."""

    name = "export-beit"

    def detect_folder(self, path: Path) -> bool:
        try:
            return json.loads((path / CONFIG_NAME).read_text()).get("method") == "beit"
        except (OSError, ValueError, AttributeError):
            return False

    def model(self, src, overrides):
        weights = self.timm_weights(src, overrides)
        model = BEiT(weights.config)
        # The export holds per-block tables, all equal to the shared one it was written from.
        wanted = beit_to_timm(model.state_dict(), per_block=True)
        if set(wanted) != set(weights.state):
            raise ValueError(f"{src.path} does not fit BEiT({weights.config}); re-export it")
        state = {k: v for k, v in weights.state.items() if ".attn.relative_position_bias_table" not in k}
        if model.config.use_shared_rel_pos_bias:
            shared = weights.state["blocks.0.attn.relative_position_bias_table"]
            state["rel_pos_bias.relative_position_bias_table"] = shared
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"mask_token", "lm_head.weight", "lm_head.bias"}:
            raise ValueError(f"{src.path} does not fit BEiT: missing {missing}, unexpected {unexpected}")
        return model

    def timm_weights(self, src, overrides):
        data = json.loads((src.path / CONFIG_NAME).read_text())
        if "timm_args" not in data or "weights" not in data:
            raise ValueError(f"{src.path / CONFIG_NAME} has no timm_args / weights; re-export the BEiT encoder")
        weights = src.path / data["weights"]
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found; the BEiT export in {src.path} is incomplete")
        config = BEiTConfig.from_dict(data.get("beit_config", {}))
        return TimmBeitWeights(config, dict(data["timm_args"]), load_file(str(weights)), [], "exported folder (beit)")


class OriginalBEiTReader(BEiTReader):
    """The original BEiT code's pretraining checkpoint (``{'model': sd}``; lm_head, mask_token)."""

    name, source = "original-beit", "original checkpoint (beit)"

    def detect(self, data, state):
        return "lm_head.weight" in state and "mask_token" in state and "blocks.0.attn.qkv.weight" in state

    def model(self, src, overrides):
        return load_original_beit(src.path, **{k: v for k, v in overrides.items() if k == "num_heads"})


class BEiTFinetuneReader(BEiTReader):
    """A ``lomar finetune`` checkpoint of a BEiT encoder: recognised, and refused with the way out."""

    name = "lomar-finetune-beit"

    def detect(self, data, state):
        config = data.get("config")
        return data.get("format") == "lomar-finetune-1" and isinstance(config, dict) and "vocab_size" in config

    def model(self, src, overrides):
        raise ValueError(f"{src.path} is a finetuned BEiT classifier, which lomar does not read back yet; load "
                         f"its 'model' state into timm.models.beit.Beit, or pass the BEiT pretraining checkpoint")

    timm_weights = model


# Before our own formats (a BEiT last.pt also has a "config"; a BEiT export is a config.json
# folder too), and before the original-LoMaR/MAE fallbacks, whose keys a BEiT checkpoint shares.
register(BEiTPretrainReader(), 5)
register(BEiTFinetuneReader(), 6)
register(BEiTExportReader(), 25)
register(OriginalBEiTReader(), 60)


def build_timm_beit(weights: TimmBeitWeights, num_classes: int = 0, global_pool: str = "avg",
                    img_size: int | None = None, drop_path: float | None = None) -> tuple[nn.Module, list[str],
                                                                                           list[str], list[str]]:
    """timm ``Beit`` with ``weights`` loaded: (model, fresh keys, dropped keys, notes).

    ``num_classes > 0`` adds a fresh head: ``global_pool='avg'`` mean-pools the un-normed patch
    tokens into a fresh ``fc_norm`` (the final norm dropped: the original BEiT finetuning),
    ``'cls'`` the normed cls token. Without a head the final norm is kept, so
    ``forward_features`` gives (B, 1+L, D) normed tokens. A new ``img_size`` resizes the relative
    position tables with timm's own filter (``checkpoint_filter_fn``).
    """
    if global_pool not in ("avg", "cls"):
        raise ValueError(f"global_pool must be avg or cls, got {global_pool!r}")
    args = dict(weights.timm_args, num_classes=num_classes)
    args["global_pool"] = "avg" if num_classes and global_pool == "avg" else "token"
    if img_size is not None:
        args["img_size"] = img_size
    if drop_path is not None:
        args["drop_path_rate"] = drop_path
    model = Beit(**args)
    state, dropped, notes = dict(weights.state), [], []
    if args["global_pool"] == "avg":
        dropped = [k for k in state if k.startswith("norm.")]
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    patch = weights.timm_args.get("patch_size", 16)
    if img_size is not None and img_size % patch:
        raise ValueError(f"img_size={img_size} is not a multiple of the BEiT patch size {patch}; "
                         f"use {max(1, img_size // patch) * patch}")
    if img_size is not None and img_size != weights.timm_args.get("img_size"):
        state = checkpoint_filter_fn(state, model)
        side = img_size // patch
        notes.append(f"relative position tables resized to the {side}x{side} grid")
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = [k for k in missing if k.startswith(("head.", "fc_norm."))]
    if unexpected or set(missing) - set(fresh):
        raise ValueError(f"the BEiT weights do not fit timm Beit({args}): missing "
                         f"{sorted(set(missing) - set(fresh)) or 'nothing'}, unexpected {unexpected or 'nothing'}")
    return model, fresh, dropped, notes
