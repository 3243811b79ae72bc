"""Every checkpoint format lomar reads: detected once, one reader per format.

:func:`read` loads a path, asks each registered :class:`Reader` in priority order whether the
contents are its format, and returns a :class:`Source`. A reader turns a source into a full
model (:meth:`Reader.model`, for ``export``/``visualize``) or into encoder weights with our key
names (:meth:`Reader.encoder`, for finetuning and probes). The key-name maps (original RPE
table names, the classifier's missing final norm) and the shape inference live here only.

A new method's checkpoint (BEiT, say) is one more :class:`Reader` subclass passed to
:func:`register`: priorities run from 10 (ours) to 90 (the original-LoMaR fallback); a reader
whose keys could also match an original one goes below 70.
"""

from __future__ import annotations

import argparse
import inspect
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lomar.checkpoints.io import safe_load
from lomar.checkpoints.keys import (
    CLASSIFIER_PREFIXES,
    ENCODER_PREFIXES,
    PRETRAIN_ONLY,
    args_dict,
    classifier_from_original,
    drop_final_norm,
    encoder_keys,
    infer_vit_config,
    lomar_from_original,
    lomar_to_original,
    mae_from_original,
    rename_rpe,
)
from lomar.models.masking import grid_size, window_positions
from lomar.models.vit import VisionTransformer, ViTConfig
from lomar.train.config import PRETRAIN_FORMAT

__all__ = ["Source", "EncoderWeights", "Reader", "register", "readers", "read", "load_model", "encoder_weights",
           "load_original", "infer_original_config", "infer_vit_config", "lomar_from_original", "lomar_to_original",
           "mae_from_original", "classifier_from_original", "encoder_keys", "drop_final_norm", "rename_rpe",
           "PRETRAIN_FORMAT", "CLASSIFIER_FORMAT", "CLASSIFIER_PREFIXES", "ENCODER_PREFIXES", "PRETRAIN_ONLY"]

CLASSIFIER_FORMAT = "lomar-classifier-1"

def infer_original_config(data: dict, **overrides) -> tuple[str, dict]:
    """Method ('lomar', 'mae' or 'classifier') and constructor settings of an original checkpoint.

    Shapes decide what they can; ``args`` (the run's arguments) and then ``overrides``
    supply the rest. Raises ValueError naming any value that stays unknown.
    """
    from lomar.models import MAE, LoMaR

    state = data.get("model", data)
    args = args_dict(data)
    if "patch_embed.proj.weight" not in state:
        raise ValueError("not an original LoMaR/MAE checkpoint: no 'patch_embed.proj.weight' in its model")
    method = "mae" if "decoder_embed.weight" in state else "classifier" if "head.weight" in state else "lomar"
    config = infer_vit_config({rename_rpe(k): v for k, v in state.items()}, args,
                              num_heads=overrides.pop("num_heads", None), img_size=overrides.pop("img_size", None))
    settings: dict = {"config": config}
    if method == "lomar":
        window = int(overrides.get("window_size", args.get("window_size", 7)))
        rows, cols = window_positions(grid_size(config.img_size, config.patch_size), window)
        # The original silently caps the window count at the grid (SPEC §6.2); do the same here.
        settings.update(window_size=window, num_windows=min(int(args.get("num_window", 4)), rows, cols),
                        mask_ratio=args.get("mask_ratio", 0.8), norm_pix_loss=args.get("norm_pix_loss", True))
    elif method == "mae":
        settings["config"] = replace(config, pos="abs")
        ddim = state["decoder_embed.weight"].shape[0]
        ddepth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
        dheads = overrides.pop("decoder_num_heads", None)
        if dheads is None and ("dec512" in str(args.get("model", "")) or ddim == 512):
            dheads = 16  # every published MAE model: 512-wide decoder, 16 heads
        if dheads is None:
            raise ValueError(f"cannot infer the number of heads of the {ddim}-wide MAE decoder; "
                             f"pass decoder_num_heads=... to load_original")
        settings.update(decoder_embed_dim=ddim, decoder_depth=ddepth, decoder_num_heads=int(dheads),
                        mask_ratio=args.get("mask_ratio", 0.75), norm_pix_loss=args.get("norm_pix_loss", True))
    else:
        settings["num_classes"] = state["head.weight"].shape[0]
    # window_size is LoMaR's K (above), never the encoder's ViTDet windows: a LoMaR encoder attends globally
    config_overrides = {k: overrides.pop(k) for k in list(overrides)
                        if k in ViTConfig.__dataclass_fields__ and k != "window_size"}
    if config_overrides:
        settings["config"] = replace(settings["config"], **config_overrides)
    # Settings of another method (a window size for an MAE checkpoint, say) are hints from
    # callers that cannot know the method beforehand: ignored. Names no model takes are typos.
    accepted = {name: set(inspect.signature(cls.__init__).parameters) - {"self", "config"}
                for name, cls in (("lomar", LoMaR), ("mae", MAE), ("classifier", VisionTransformer))}
    unknown = sorted(set(overrides) - set().union(*accepted.values()))
    if unknown:
        known = set().union(*accepted.values(), ViTConfig.__dataclass_fields__)
        raise ValueError(f"unknown override(s) {', '.join(unknown)} for load_original; "
                         f"accepted: {', '.join(sorted(known))}")
    settings.update({k: v for k, v in overrides.items() if k in accepted[method]})
    return method, settings


def _original_model(data: dict, path: Path, overrides: dict) -> nn.Module:
    from lomar.models import MAE, LoMaR

    method, settings = infer_original_config(data, **overrides)
    state = data.get("model", data)
    if method == "lomar":
        model: nn.Module = LoMaR(**settings)
        converted = lomar_from_original(state, keep_pos_embed=model.encoder.pos_embed is not None)
    elif method == "mae":
        model = MAE(**settings)
        converted = mae_from_original(state)
    else:
        model = VisionTransformer(settings.pop("config"), **settings)
        converted = classifier_from_original(state, model)
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as exc:
        details = " ".join(line.strip() for line in str(exc).splitlines()[1:])
        raise ValueError(f"checkpoint {path} does not match the inferred {method} model: {details[:400]}; "
                         f"pass overrides to load_original") from exc
    return model


def load_original(path: str | Path, **overrides) -> nn.Module:
    """Build our model from an original LoMaR / MAE (pretraining or finetuned) checkpoint.

    Returns a :class:`LoMaR`, :class:`MAE` or classifier :class:`VisionTransformer`, with
    weights loaded strictly (the unused LoMaR ``pos_embed`` is dropped, SPEC §6.3).
    """
    return _original_model(safe_load(path), Path(path), overrides)


# ---- readers ----------------------------------------------------------------------------------
@dataclass
class Source:
    """A checkpoint read once: its format, the raw dict and the state dict (``{}`` for an export)."""

    path: Path
    format: str
    data: dict
    state: dict


@dataclass
class EncoderWeights:
    """An encoder's architecture and weights under VisionTransformer key names."""

    config: ViTConfig
    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)  # source keys the encoder does not use
    source: str = ""  # "pretrain checkpoint (lomar)", "exported folder", "original checkpoint (mae)", ...


class Reader:
    """One checkpoint format. Subclasses set ``name`` and implement the three methods."""

    name = "?"

    def detect(self, data: dict, state: dict) -> bool:
        raise NotImplementedError

    def detect_folder(self, path: Path) -> bool:
        """Whether the folder ``path`` (holding a config.json) is this format."""
        return False

    def model(self, src: Source, overrides: dict) -> nn.Module:
        raise NotImplementedError

    def encoder(self, src: Source, overrides: dict) -> EncoderWeights:
        raise NotImplementedError


_READERS: list[tuple[int, Reader]] = []


def register(reader: Reader, priority: int) -> Reader:
    """Add a reader; lower priorities are asked first (the original-LoMaR fallback is 90)."""
    _READERS.append((priority, reader))
    _READERS.sort(key=lambda item: item[0])
    return reader


def readers() -> list[Reader]:
    return [reader for _, reader in _READERS]


def _hints(data: dict) -> dict:
    hints: dict = {}
    for key in ("config", "vit_config", "args"):
        value = data.get(key)
        hints.update(vars(value) if isinstance(value, argparse.Namespace) else value if isinstance(value, dict) else {})
    return {k: v for k, v in hints.items() if k in ("num_heads", "img_size", "input_size") and isinstance(v, int)}


def _saved_windows(config: ViTConfig, data: dict) -> ViTConfig:
    """``config`` (inferred from shapes) with the ViTDet windows of the ViTConfig a classifier
    checkpoint saved (``lomar finetune``: ``config``, :func:`pretrain_checkpoint`: ``vit_config``):
    no shape tells them, and the same weights with global attention are another model."""
    for key in ("config", "vit_config"):
        saved = data.get(key)
        if isinstance(saved, dict) and "global_blocks" in saved:  # a PretrainConfig has none
            return replace(config, window_size=saved.get("window_size", 0), global_blocks=saved["global_blocks"])
    return config


class PretrainReader(Reader):
    """Ours: ``lomar pretrain`` / ``load-original`` output, ``{"model": LoMaR/MAE state, "config"}``."""

    name = "lomar-pretrain"

    def detect(self, data, state):
        return isinstance(data.get("config"), dict) and any(k.startswith("encoder.") for k in state)

    def _config(self, src: Source):
        from lomar.train.config import PretrainConfig, saved_settings

        known = set(PretrainConfig.__dataclass_fields__)
        return PretrainConfig(**{k: v for k, v in saved_settings(src.data).items() if k in known})

    def model(self, src, overrides):
        from lomar.train.config import build_model

        model = build_model(self._config(src))
        model.load_state_dict(src.state, strict=True)
        return model

    def encoder(self, src, overrides):
        from lomar.train.config import vit_config

        config = self._config(src)
        state = {k.removeprefix("encoder."): v for k, v in src.state.items() if k.startswith("encoder.")}
        dropped = [k for k in src.state if not k.startswith("encoder.")]  # mask token, pixel head, decoder
        return EncoderWeights(vit_config(config), state, dropped, f"pretrain checkpoint ({config.method})")


# Every key a VisionTransformer (encoder or classifier) has, and nothing else.
_VIT_KEY = re.compile(r"^(cls_token|pos_embed|(patch_embed\.proj|norm|fc_norm|head)\.(weight|bias)|blocks\.\d+\."
                      r"((norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|attn\.rpe\.table))$")


class VitReader(Reader):
    """Ours: a classifier, encoder or ``lomar finetune`` checkpoint (VisionTransformer key names).

    An original MAE finetuned classifier has the same keys and is read here too."""

    name = "lomar-vit"

    def detect(self, data, state):
        return "patch_embed.proj.weight" in state and all(_VIT_KEY.match(k) for k in state)

    def model(self, src, overrides):
        config = _saved_windows(infer_vit_config(src.state, _hints(src.data), **overrides), src.data)
        state = src.state
        num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
        model = VisionTransformer(config, num_classes=num_classes)
        if config.pos == "abs" and state["pos_embed"].shape != model.pos_embed.shape:
            state = {k: v for k, v in state.items() if k != "pos_embed"}  # fixed sin-cos: ours is equal
        if num_classes:
            state, _ = drop_final_norm(state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"pos_embed"}:
            raise ValueError(f"weights do not fit the inferred {config.embed_dim}-wide, {config.depth}-deep "
                             f"encoder: missing {missing}, unexpected {unexpected}")
        return model

    def encoder(self, src, overrides):
        saved = src.data.get("config")
        if isinstance(saved, dict) and "embed_dim" in saved:  # a finetune checkpoint keeps its ViTConfig
            return EncoderWeights(ViTConfig.from_dict(saved), dict(src.state), [], "finetune checkpoint")
        config = _saved_windows(infer_vit_config(src.state, _hints(src.data), **overrides), src.data)
        return EncoderWeights(config, dict(src.state), [], "classifier checkpoint")


class ExportReader(Reader):
    """Ours: a folder written by ``lomar export`` or ``lomar pretrain`` (config.json + safetensors)."""

    name = "export"

    def detect(self, data, state):
        return False  # folders are recognised by :func:`read` before anything is loaded

    def detect_folder(self, path):
        return True

    def model(self, src, overrides):
        from lomar.checkpoints.export import create_encoder

        # window_size here is the command line's LoMaR window (K), not the export's ViTDet windows
        fields = set(ViTConfig.__dataclass_fields__) - {"window_size"}
        return create_encoder(src.path, **{k: v for k, v in overrides.items() if k in fields})

    def encoder(self, src, overrides):
        from lomar.checkpoints.export import create_encoder

        encoder = create_encoder(src.path)
        return EncoderWeights(encoder.config, encoder.state_dict(), [], "exported folder")


class OriginalReader(Reader):
    """The original LoMaR / MAE code's pretraining or finetuned checkpoint (``{'model', 'args'}``)."""

    def __init__(self, name: str, method: str):
        self.name, self.method = name, method

    def detect(self, data, state):
        if "patch_embed.proj.weight" not in state:
            return False
        found = "mae" if "decoder_embed.weight" in state else "classifier" if "head.weight" in state else "lomar"
        return found == self.method

    def model(self, src, overrides):
        return _original_model(src.data, src.path, dict(overrides))

    def encoder(self, src, overrides):
        config = infer_vit_config({rename_rpe(k): v for k, v in src.state.items()}, args_dict(src.data),
                                  num_heads=overrides.get("num_heads"))
        if self.method == "lomar":
            renamed = lomar_from_original(src.state, keep_pos_embed=True)
            state = {k.removeprefix("encoder."): v for k, v in renamed.items() if k.startswith("encoder.")}
            dropped = [k for k in renamed if not k.startswith("encoder.")]
            if config.pos == "rpe" and "pos_embed" in state:  # SPEC §6.3: the stored sin-cos table is never used
                dropped.append("pos_embed")
                del state["pos_embed"]
        else:
            keep = ENCODER_PREFIXES + CLASSIFIER_PREFIXES
            state = {rename_rpe(k): v for k, v in src.state.items() if k.startswith(keep)}
            dropped = [k for k in src.state if not k.startswith(keep)]
        if self.method == "mae":
            config = replace(config, pos="abs")
        return EncoderWeights(config, state, dropped, f"original checkpoint ({self.method})")


register(PretrainReader(), 10)
register(VitReader(), 20)
register(ExportReader(), 30)
register(OriginalReader("original-mae", "mae"), 70)
register(OriginalReader("original-classifier", "classifier"), 80)
register(OriginalReader("original-lomar", "lomar"), 90)
import lomar.checkpoints.formats_beit  # noqa: E402,F401  registers the BEiT readers


def _read_sharded(path: Path) -> dict:
    """A sharded checkpoint folder, consolidated in memory (through a scratch file) to the single-file form."""
    import tempfile

    from lomar.train.fsdp import consolidate

    with tempfile.TemporaryDirectory() as scratch:
        return safe_load(consolidate(path, Path(scratch) / "consolidated.pt"))


def read(path: str | Path) -> tuple[Reader, Source]:
    """Load ``path`` once and find its reader. Raises FileNotFoundError or ValueError naming the problem."""
    from lomar.checkpoints.export import CONFIG_NAME

    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():  # a sharded `lomar pretrain --fsdp` checkpoint
        data = _read_sharded(path)
    elif path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} is a folder without {CONFIG_NAME}; pass a checkpoint file or a folder "
                             f"written by `lomar export` / `lomar pretrain`")
        reader = next(r for r in readers() if r.detect_folder(path))
        return reader, Source(path, reader.name, {}, {})
    else:
        data = safe_load(path)
    state = data.get("model", data)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state dict (a dict of tensors) under 'model'")
    for reader in readers():
        if reader.detect(data, state):
            return reader, Source(path, reader.name, data, state)
    sample = ", ".join(sorted(state)[:4]) or "no tensors"
    raise ValueError(f"checkpoint {path} is in no format lomar reads (keys: {sample}, ...); expected ours "
                     f"(lomar pretrain / finetune / export) or an original LoMaR / MAE / BEiT checkpoint")


def load_model(path: str | Path, **overrides) -> nn.Module:
    """A :class:`LoMaR`, :class:`MAE` or :class:`VisionTransformer` from any checkpoint or export.

    ``overrides`` (``num_heads``, ``img_size``, ``window_size``, ``num_windows``,
    ``decoder_num_heads``) fill in what an original checkpoint cannot tell. Raises ValueError
    or FileNotFoundError with a message that names the problem.
    """
    reader, src = read(path)
    return reader.model(src, {k: v for k, v in overrides.items() if v is not None})


def encoder_weights(path: str | Path, num_heads: int | None = None) -> EncoderWeights:
    """The encoder architecture and weights (VisionTransformer keys) of any checkpoint or export."""
    reader, src = read(path)
    return reader.encoder(src, {"num_heads": num_heads} if num_heads else {})
