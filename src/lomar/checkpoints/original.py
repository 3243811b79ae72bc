"""Checkpoints of the original LoMaR and MAE code: pretraining and finetuned classifiers
(``{'model', 'args'}``), read by shape inference; ``load_original`` builds our model from one."""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import replace
from pathlib import Path

from torch import nn

from lomar.checkpoints.export_write import export_folder_of
from lomar.checkpoints.io import check_finite, differences, safe_load
from lomar.checkpoints.keys import (
    CLASSIFIER_PREFIXES,
    ENCODER_PREFIXES,
    args_dict,
    classifier_from_original,
    infer_vit_config,
    lomar_from_original,
    mae_from_original,
    rename_rpe,
    vit_from_original,
)
from lomar.checkpoints.keys_beit import holds_beit_keys
from lomar.checkpoints.kinds import CLASSIFIER_FORMAT, FINETUNE_FORMAT, classifier_pool
from lomar.checkpoints.reader import EncoderWeights, Reader, Source, refuse_unused, register
from lomar.checkpoints.timm_layout import lomar_layout, saved_size, timm_layouts
from lomar.models.abs_pos import square_side
from lomar.models.lomar import LoMaR
from lomar.models.mae import MAE
from lomar.models.masking import grid_size, window_positions
from lomar.models.vit import VisionTransformer, ViTConfig
from lomar.values import as_sides

log = logging.getLogger("lomar.checkpoints")

__all__ = ["infer_original_config", "load_original", "OriginalReader"]


def _refuse_beit(state: dict, where: object = "this checkpoint") -> None:
    """A BEiT state dict (layer scale, q/v biases, relative position tables, lm_head) has the ViT's key names too: read
    as LoMaR or MAE it would ask for --num-heads and then fail to load, which would hide what it is."""
    if not holds_beit_keys(state):
        return
    if "lm_head.weight" in state:
        raise ValueError(f"{where} is an original BEiT pretraining checkpoint, not a LoMaR / MAE one: `lomar export`, "
                         "`knn`, `linprobe` and `finetune --pretrained` read it as it is (a timm Beit)")
    raise ValueError(f"{where} is a BEiT checkpoint without its lm_head (a finetuned BEiT, or a timm Beit), which "
                     "lomar does not read; pass the original BEiT pretraining checkpoint")


def _method(state: dict) -> str:
    """'mae' (a decoder), 'classifier' (a head), 'lomar' (its mask token or pixel head ``encoder_pred``), else
    'encoder': a ViT's weights alone, as timm's ``num_classes=0`` saves them, which no pretraining model holds."""
    if "decoder_embed.weight" in state:
        return "mae"
    if "head.weight" in state:
        return "classifier"
    return "lomar" if "mask_token" in state or "encoder_pred.weight" in state else "encoder"


def infer_original_config(data: dict, **overrides) -> tuple[str, dict]:
    """Method ('lomar', 'mae', 'classifier' or 'encoder') and constructor settings of an original checkpoint.

    Shapes decide what they can; ``args`` (the run's arguments) and then ``overrides``
    supply the rest. Raises ValueError naming any value that stays unknown.
    """
    return _infer(data, overrides, whole=True)


def _infer(data: dict, overrides: dict, whole: bool, where: object = "this checkpoint") -> tuple[str, dict]:
    """:func:`infer_original_config` of the checkpoint ``where`` (its file's Path, which a refusal's conversion command
    names, or words for a dict given); not ``whole``: a pretraining model's encoder settings
    alone (``config``), nothing asked of the parts an encoder leaves out (an MAE decoder's heads, which no shape tells;
    LoMaR's windows)."""
    state = data.get("model", data)
    args = args_dict(data)
    if "patch_embed.proj.weight" not in state:
        ours = "format" in data or "model_spec" in data
        raise ValueError("not an original LoMaR/MAE checkpoint: no 'patch_embed.proj.weight' in its model"
                         + ("; it is one of lomar's own: lomar.eval.features.load_pretrained_encoder reads its encoder"
                            if ours else ""))
    _refuse_beit(state)
    method = _method(state)
    path = where if isinstance(where, Path) else None  # a file to name in the conversion command
    config = infer_vit_config({rename_rpe(k): v for k, v in state.items()}, args, path,
                              num_heads=overrides.pop("num_heads", None), img_size=overrides.pop("img_size", None))
    _check_tiles(config)
    settings: dict = {"config": config}
    if method == "lomar" and whole:
        window = int(overrides.get("window_size", args.get("window_size", 7)))
        rows, cols = window_positions(grid_size(config.img_size, config.patch_size), window)
        # The original silently caps the window count at the grid (SPEC §6.2): the model it trained used the cap.
        # An explicit num_windows is the caller's choice (applied below, checked by LoMaR): nothing to warn about.
        asked = int(args.get("num_window", 4))
        cap = min(rows, cols)
        if asked > cap and "num_windows" not in overrides:
            asks = ("its args ask for %d %dx%d windows, which the original capped" if "num_window" in args
                    else "no window count in its args, and the original's default of %d %dx%d windows is capped")
            side = config.img_size if isinstance(config.img_size, int) else "x".join(map(str, config.img_size))
            log.warning("original checkpoint: " + asks + " at %d on a %s px image; loaded with %d",
                        asked, window, window, cap, side, cap)
        settings.update(window_size=window, num_windows=min(asked, cap),
                        mask_ratio=args.get("mask_ratio", 0.8), norm_pix_loss=args.get("norm_pix_loss", True))
    elif method == "mae":
        settings["config"] = replace(config, pos="abs")
    if method == "mae" and whole:
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
    elif method == "classifier":
        settings["num_classes"] = rows = state["head.weight"].shape[0]
        if overrides.get("num_classes", rows) != rows:
            raise ValueError(f"num_classes={overrides['num_classes']!r} does not fit {where}: its head has {rows} "
                             f"rows; leave num_classes out")
        # the original's finetune keeps the final norm for a cls-token head (--cls_token), deletes it for fc_norm's mean
        settings["global_pool"] = classifier_pool({}, state)
        asked = overrides.get("global_pool", settings["global_pool"])
        if asked != settings["global_pool"]:
            holds = "fc_norm" if settings["global_pool"] == "avg" else "its final norm and no fc_norm"
            raise ValueError(f"global_pool={asked!r} does not fit {where}: its head reads {holds}, so it pools by "
                             f"{settings['global_pool']!r}; leave global_pool out")
    # window_size is LoMaR's K (above), never the encoder's ViTDet windows: a LoMaR encoder attends globally
    config_overrides = {k: overrides.pop(k) for k in list(overrides)
                        if k in ViTConfig.__dataclass_fields__ and k != "window_size"}
    settings["config"] = replace(settings["config"], **config_overrides)
    # Names no model takes are typos; a setting of another method (a window size for an MAE checkpoint) is refused, as
    # the model built as if it were not given would mislead. One of this model's that an exported encoder leaves out
    # (its decoder's heads) is this checkpoint's still: the same flags serve load-original and export.
    accepted = {name: set(inspect.signature(cls.__init__).parameters) - {"self", "config"}
                for name, cls in (("lomar", LoMaR), ("mae", MAE), ("classifier", VisionTransformer),
                                  ("encoder", VisionTransformer))}
    unknown = sorted(set(overrides) - set().union(*accepted.values()))
    if unknown:
        known = set().union(*accepted.values(), ViTConfig.__dataclass_fields__)
        raise ValueError(f"unknown override(s) {', '.join(unknown)} for load_original; "
                         f"accepted: {', '.join(sorted(known))}")
    label = {"lomar": "an original LoMaR pretraining checkpoint", "mae": "an original MAE pretraining checkpoint",
             "classifier": "an original finetuned classifier checkpoint",
             "encoder": "a ViT encoder's weights without a head"}[method]
    refuse_unused(where, label, overrides, accepted[method])
    if whole or method in ("classifier", "encoder"):
        settings.update(overrides)
    return method, settings


def _check_tiles(config: ViTConfig) -> None:
    """ValueError naming img_size (saved or given) where it does not tile into the checkpoint's patches: the grid's
    own message names no parameter, which a command reads as its flag (lomar.errors.in_flags)."""
    sides, p = as_sides(config.img_size), config.patch_size
    if all(side % p == 0 for side in sides):
        return
    fit = tuple(max(1, side // p) * p for side in sides)
    size, fit = (sides[0], fit[0]) if isinstance(config.img_size, int) else (sides, fit)
    raise ValueError(f"img_size={size} is not divisible by the checkpoint's patch size {p}; pass a multiple of {p}, "
                     f"e.g. img_size={fit}")


def _original_model(data: dict, path: Path, overrides: dict, whole: bool = True) -> nn.Module:
    """The model of an original checkpoint; not ``whole``: a pretraining model's encoder alone (see :func:`_infer`),
    checked and loaded as the whole model's is. A timm ViT's layout lomar's keys lack is read in lomar's
    (:func:`~lomar.checkpoints.timm_layout.lomar_layout`), its table told by the size it saved, else by a given
    ``img_size``: a given one that contradicts the saved one (refused below) does not turn the table into timm's."""
    _refuse_beit(data.get("model", data), path)
    state, saved = data.get("model", data), saved_size(data)
    if (ours := lomar_layout(state, path, saved or overrides.get("img_size"), given=saved is None)) is not state:
        data = {**data, "model": ours} if "model" in data else ours
    method, settings = _infer(data, dict(overrides), whole, path)
    state = data.get("model", data)
    try:  # a value the run's saved args give (norm_pix_loss='no', say) would otherwise read as a flag's
        model: nn.Module = (LoMaR(**settings) if method == "lomar" and whole else MAE(**settings)
                            if method == "mae" and whole else VisionTransformer(settings.pop("config"), **settings))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"checkpoint {path}: {exc} (from its saved args, or an override given)") from None
    encoder = getattr(model, "encoder", model)
    if method == "lomar":
        converted = lomar_from_original(state, keep_pos_embed=encoder.pos_embed is not None)
    elif method == "mae":
        _check_table(state, encoder)
        converted = mae_from_original(state)
    elif method == "classifier":
        converted = classifier_from_original(state, model)
    else:
        converted = _encoder_state(state, model, path)
    if model is encoder and method in ("lomar", "mae"):  # a pretraining model's encoder alone, as it builds it
        encoder.freeze_pos_embed()
        converted = {k.removeprefix("encoder."): v for k, v in converted.items() if k.startswith("encoder.")}
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as exc:
        details = differences(exc)
        raise ValueError(f"checkpoint {path} does not match the inferred {method} model: {details[:400]}; "
                         f"pass overrides to load_original") from exc
    return model


def _encoder_state(state: dict, model: VisionTransformer, path: Path) -> dict:
    """A ViT's weights without a head, under ``model``'s names. timm's ``num_classes=0`` under ``global_pool='avg'``
    keeps ``fc_norm`` (the norm after pooling) and no final norm: as every reader of such weights takes them (a
    classifier's as a plain encoder), its final norm starts as identity and ``fc_norm``, which no head follows, is left
    out, said in a warning."""
    converted = vit_from_original(state, model)
    if "fc_norm.weight" not in converted or "norm.weight" in converted:
        return converted
    log.warning("%s: its fc_norm (timm's global_pool='avg' norm after pooling, which no head follows) is left out; it "
                "holds no final norm, which the encoder starts as identity", path)
    kept = {k: v for k, v in converted.items() if not k.startswith("fc_norm.")}
    return {**kept, **{f"norm.{k}": v for k, v in model.norm.state_dict().items()}}


def _check_table(state: dict, encoder: VisionTransformer) -> None:
    """ValueError naming the img_size (saved or given) whose grid is not that of the checkpoint's position table: a
    strict load's size mismatch names keys and shapes (decoder_pos_embed's first), not the value to change."""
    table = state.get("pos_embed")
    if table is None or table.ndim != 3 or table.shape == encoder.pos_embed.shape:
        return
    c = encoder.config
    rows, cols = grid_size(c.img_size, c.patch_size)
    side = square_side(table)
    size = c.img_size if isinstance(c.img_size, int) else tuple(c.img_size)
    fix = f"is a {side}x{side} grid; pass img_size={side * c.patch_size}, the size it was trained at, or leave " \
        f"img_size out" if side is not None else f"holds {table.shape[1] - 1} patches, not a square grid; pass " \
        f"img_size=(height, width) for the size it was trained at"
    raise ValueError(f"img_size={size} makes a {rows}x{cols} grid of patch_size {c.patch_size}, but the checkpoint's "
                     f"position table {fix}")


def _refuse_our_classifier(data: dict, path: str | os.PathLike) -> None:
    """A classifier of lomar's own (``lomar finetune``'s checkpoint, load_original's of a classifier) has an original
    finetuned model's keys and would load as one, but without what only its saved ViTConfig says (its image size,
    ViTDet windows)."""
    kind = data.get("format")
    if kind in (FINETUNE_FORMAT, CLASSIFIER_FORMAT):
        raise ValueError(f"{path} is lomar's own ({kind} format), not an original LoMaR / MAE checkpoint: it needs no "
                         f"conversion; lomar.load_model reads it as it is")


def load_original(path: str | Path, **overrides) -> nn.Module:
    """Build our model from an original LoMaR / MAE (pretraining or finetuned) checkpoint.

    Returns a :class:`LoMaR`, :class:`MAE`, classifier :class:`VisionTransformer` or (of a ViT's weights without a
    head, timm's ``num_classes=0``) encoder :class:`VisionTransformer`, with
    weights loaded strictly (the unused LoMaR ``pos_embed`` is dropped, SPEC §6.3).
    """
    if not isinstance(path, (str, os.PathLike)):  # else torch's "expected str, bytes or os.PathLike" names no argument
        raise TypeError(f"load_original takes the checkpoint's path (a str or Path), got {type(path).__name__} "
                        f"{path!r}")
    if (folder := export_folder_of(Path(path))) is not None:  # its keys are those of a ViT's weights without a head
        raise ValueError(f"{path} is the weights file of the `lomar export` folder {folder}, lomar's own: it needs no "
                         f"conversion; lomar.create_encoder({str(folder)!r}) reads the folder")
    data = safe_load(path)
    _refuse_our_classifier(data, path)
    model = _original_model(data, Path(path), overrides)
    check_finite(model, path)
    return model


class OriginalReader(Reader):
    """The original LoMaR / MAE code's pretraining or finetuned checkpoint (``{'model', 'args'}``)."""

    def __init__(self, name: str, method: str):
        self.name, self.method = name, method

    def detect(self, data, state):
        return "patch_embed.proj.weight" in state and _method(state) == self.method

    def model(self, src, overrides):
        return _original_model(src.data, src.path, dict(overrides))

    def export_model(self, src: Source, overrides: dict) -> nn.Module:
        """What ``lomar export`` writes: a pretraining checkpoint's encoder alone (nothing asked of its decoder),
        weights checked finite; a classifier whole."""
        model = _original_model(src.data, src.path, dict(overrides), whole=False)
        check_finite(model, src.path)
        return model

    def encoder(self, src, overrides):
        _refuse_beit(src.state, src.path)
        config = infer_vit_config({rename_rpe(k): v for k, v in src.state.items()}, args_dict(src.data), src.path,
                                  num_heads=overrides.get("num_heads"))
        keep = ENCODER_PREFIXES + CLASSIFIER_PREFIXES
        state = {rename_rpe(k): v for k, v in src.state.items() if k.startswith(keep)}
        dropped = [k for k in src.state if not k.startswith(keep)]
        if config.pos == "rpe" and "pos_embed" in state:  # SPEC §6.3: the stored sin-cos table is never used
            dropped.append("pos_embed")
            del state["pos_embed"]
        if self.method == "mae":
            config = replace(config, pos="abs")
        return EncoderWeights(config, state, dropped, f"original checkpoint ({self.method})")


class TimmLayoutReader(Reader):
    """A timm ViT encoder or classifier in a layout lomar's keys lack (layer scale, a bias-less qkv, a table without
    the class token's entry; register tokens, refused): read as an original one once in lomar's layout
    (:mod:`lomar.checkpoints.timm_layout`). Asked before lomar's own ViT reader, whose keys a bias-less qkv or a
    ``no_embed_class`` table also match."""

    name = "timm-vit"

    def detect(self, data, state):
        return bool(timm_layouts(state, saved_size(data)))

    def model(self, src, overrides):
        return _original_model(src.data, src.path, dict(overrides))

    def encoder(self, src, overrides):
        _refuse_beit(src.state, src.path)
        size = saved_size(src.data)
        state = lomar_layout(src.state, src.path, size)
        method = "classifier" if "head.weight" in state else "encoder"
        weights = OriginalReader(self.name, method).encoder(replace(src, state=state), overrides)
        return replace(weights, source=f"timm ViT ({', '.join(timm_layouts(src.state, size))})")


register(TimmLayoutReader(), 15)
register(OriginalReader("original-mae", "mae"), 70)
register(OriginalReader("original-classifier", "classifier"), 80)
register(OriginalReader("original-lomar", "lomar"), 90)
register(OriginalReader("original-encoder", "encoder"), 95)
