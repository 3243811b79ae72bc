"""BEiT's checkpoint formats, registered with the other readers (:mod:`lomar.checkpoints.formats` asks them all).

A BEiT reader (our pretraining ``last.pt``, a BEiT export folder, an original BEiT pretraining
checkpoint) gives the full pretraining :class:`~lomar.models.beit.BEiT` (:meth:`Reader.model`) and,
for finetuning and probes, :meth:`BEiTReader.timm_weights`: the encoder in timm's ``Beit`` layout
with the relative position bias per block, each block's table initialised from the shared
pretraining one (BEiT's finetuning recipe), mask token and ``lm_head`` dropped. A ``lomar finetune`` checkpoint of a
BEiT encoder gives its classifier (:class:`BEiTFinetuneReader`), timm's ``Beit`` as it was finetuned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from lomar.checkpoints.export_beit import read_beit_export
from lomar.checkpoints.file_names import CONFIG_NAME
from lomar.checkpoints.keys_beit import beit_to_timm, load_original_beit
from lomar.checkpoints.kinds import FINETUNE_FORMAT, classifier_pool
from lomar.checkpoints.reader import (
    EncoderWeights,
    Reader,
    Source,
    build_strict,
    folder_source,
    pretrain_spec,
    refuse_unused,
    register,
    saved_settings,
    saved_spec,
    spec_settings,
)
from lomar.models.beit import BEiT, BEiTConfig, timm_global_pool

__all__ = ["TimmBeitWeights", "BEiTReader", "BEiTPretrainReader", "BEiTExportReader", "OriginalBEiTReader",
           "BEiTFinetuneReader", "beit_classifier_spec"]


@dataclass
class TimmBeitWeights:
    """A BEiT encoder as timm ``Beit(**timm_beit_args(config))`` (no classifier) and its state dict under timm keys."""

    config: BEiTConfig  # of the pretraining model
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
        return TimmBeitWeights(beit.config, timm_state, dropped, self.source)

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
        spec, run = pretrain_spec(src), saved_settings(src.data)
        # its run's masking windows are its own too (visualize draws them), though the BEiT built here takes none
        windows = {"window_size": run.get("window_size"), "num_windows": run.get("windows")}
        refuse_unused(src.path, "a lomar BEiT pretraining checkpoint, which carries its own settings", overrides,
                      saved={**spec_settings(spec), **{k: v for k, v in windows.items() if v is not None}})
        return build_strict(spec, src.state, src.path)


class BEiTExportReader(BEiTReader):
    """A folder from ``lomar export`` / ``lomar pretrain --method beit``: config.json ("method": "beit")."""

    name = "export-beit"

    def detect_folder(self, path: Path) -> bool:
        try:
            return json.loads((path / CONFIG_NAME).read_text()).get("method") == "beit"
        except (OSError, ValueError, AttributeError, RecursionError):  # not ours to report: the export reader does
            return False

    def model(self, src, overrides):
        weights = self.timm_weights(src, overrides)  # validated: the shapes are those of BEiT(weights.config)
        model = BEiT(weights.config)
        state = {k: v for k, v in weights.state.items() if ".attn.relative_position_bias_table" not in k}
        if model.config.use_shared_rel_pos_bias:
            shared = weights.state["blocks.0.attn.relative_position_bias_table"]
            state["rel_pos_bias.relative_position_bias_table"] = shared
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"mask_token", "lm_head.weight", "lm_head.bias"}:
            raise ValueError(f"{src.path} does not fit BEiT: missing {missing}, unexpected {unexpected}")
        return model

    def timm_weights(self, src, overrides):
        # The export holds per-block tables, all equal to the shared one it was written from. Validated before
        # anything is read or built: a small export whose config claims huge widths allocates nothing.
        config, _, weights = read_beit_export(src.path)
        refuse_unused(src.path, "a BEiT export, which carries its own settings", overrides, saved=config.to_dict())
        source = folder_source(src.path, "exported folder (beit)")
        return TimmBeitWeights(config, load_file(str(weights)), [], source)


class OriginalBEiTReader(BEiTReader):
    """The original BEiT code's pretraining checkpoint (``{'model': sd}``; lm_head, mask_token)."""

    name, source = "original-beit", "original checkpoint (beit)"

    def detect(self, data, state):
        return "lm_head.weight" in state and "mask_token" in state and "blocks.0.attn.qkv.weight" in state

    def model(self, src, overrides):
        refuse_unused(src.path, "an original BEiT pretraining checkpoint", overrides, {"num_heads"})
        return load_original_beit(src.path, **overrides)


_CLASSIFIER_ARCH = "lomar.models.beit_classifier:BEiTClassifier"


def beit_classifier_spec(src: Source) -> dict:
    """The model spec of a ``lomar finetune`` checkpoint of a BEiT encoder: saved, or where it saved none, the
    classifier its finetuning built, from its ``config`` (the BEiTConfig it was finetuned as), its head's rows and its
    pooling (:func:`~lomar.checkpoints.kinds.classifier_pool`), which rebuild it exactly. ValueError for a spec of
    another model, or one whose config is not the ``config`` beside it (``--eval-only`` reads that one)."""
    config, spec = src.data.get("config"), src.data.get("model_spec")
    if spec is None:
        rows = src.state["head.weight"].shape[0] if "head.weight" in src.state else 0
        pool = timm_global_pool(classifier_pool(src.data, src.state), rows)
        return {"arch": _CLASSIFIER_ARCH, "config": config, "args": {"num_classes": rows, "global_pool": pool},
                "prefix": ""}
    if saved_spec(src, _CLASSIFIER_ARCH, "it is a finetuned BEiT classifier").get("config") != config:
        raise ValueError(f"{src.path}: its model_spec's config and its config describe other BEiT encoders; delete "
                         f"the one it was not trained as")
    return spec


class BEiTFinetuneReader(BEiTReader):
    """A ``lomar finetune`` checkpoint of a BEiT encoder: its classifier, timm's ``Beit``
    (:class:`~lomar.models.beit_classifier.BEiTClassifier`), rebuilt from its model spec; no encoder to finetune or
    probe (under ``avg`` pooling its final norm is gone into the head's ``fc_norm``), for which its pretraining
    checkpoint is named."""

    name = "lomar-finetune-beit"

    def detect(self, data, state):
        config = data.get("config")
        return data.get("format") == FINETUNE_FORMAT and isinstance(config, dict) and "vocab_size" in config

    def model(self, src, overrides):
        spec = beit_classifier_spec(src)
        refuse_unused(src.path, "a finetuned BEiT classifier, which carries its own settings (its relative position "
                      "tables fix its image size)", overrides, saved=spec_settings(spec))
        if isinstance(config := spec.get("config"), dict):  # its drop path was its training's, as a ViT reader's
            spec = {**spec, "config": {**config, "drop_path_rate": 0.0}}
        return build_strict(spec, src.state, src.path)

    def timm_weights(self, src, overrides):
        raise ValueError(f"{src.path} is a finetuned BEiT classifier, no encoder to start from (lomar.load_model "
                         f"rebuilds the classifier); pass the BEiT pretraining checkpoint it was finetuned from")


# Before our own formats (a BEiT last.pt also has a "config"; a BEiT export is a config.json
# folder too), and before the original-LoMaR/MAE fallbacks, whose keys a BEiT checkpoint shares.
register(BEiTPretrainReader(), 5)
register(BEiTFinetuneReader(), 6)
register(BEiTExportReader(), 25)
register(OriginalBEiTReader(), 60)
