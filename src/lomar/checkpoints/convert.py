"""A model's checkpoints and exports as ``lomar export`` and ``lomar load-original`` write them: the model an export
takes of any checkpoint (:func:`export_model`), its method fields, and our checkpoint of a model
(:func:`pretrain_checkpoint`). Every checkpoint format is read by :mod:`lomar.checkpoints.formats`, whose
:func:`~lomar.checkpoints.formats.load_model` gives any checkpoint's model.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lomar.checkpoints.formats import read
from lomar.checkpoints.formats_beit import BEiTFinetuneReader
from lomar.checkpoints.formats_dense import DenseReader, whole_model_refusal
from lomar.checkpoints.formats_probe import LinprobeReader
from lomar.checkpoints.kinds import CLASSIFIER_FORMAT, PRETRAIN_FORMAT
from lomar.checkpoints.original import OriginalReader
from lomar.models.lomar import LoMaR
from lomar.models.mae import MAE
from lomar.models.spec import build_from_spec, model_spec
from lomar.models.vit import MODEL_SIZES, PATCH_SIZES, VisionTransformer

__all__ = ["export_model", "encoder_of", "pretrain_method", "method_metadata", "pretrain_checkpoint"]


def encoder_of(model: nn.Module) -> VisionTransformer:
    """The encoder of a LoMaR / MAE model, or the VisionTransformer itself."""
    encoder = getattr(model, "encoder", model)
    if not isinstance(encoder, VisionTransformer):
        raise TypeError(f"{type(model).__name__} has no lomar ViT encoder; pass a lomar.VisionTransformer, a LoMaR or "
                        f"MAE model, an export folder or a checkpoint")
    return encoder


def pretrain_method(model: nn.Module) -> str:
    """The ``lomar pretrain --method`` a LoMaR / MAE model is trained by, as its run's settings name it: 'mae' for
    MAE with windows too (an MAEWindow)."""
    if isinstance(model, MAE):
        return "mae"
    if isinstance(model, LoMaR):
        return "lomar"
    raise TypeError(f"cannot write a pretraining checkpoint for {type(model).__name__}")


def method_metadata(model: nn.Module, method: str | None = None) -> dict:
    """The method fields of an export's config.json, ``lomar pretrain``'s own and ``lomar export``'s alike: ``method``
    (``method`` as given, else :func:`pretrain_method`) and, for MAE with windows (an MAEWindow), ``windows``: N, as
    the run's settings name it (--method mae --windows N)."""
    method = method or pretrain_method(model)
    windows = getattr(model, "num_windows", 0) if method == "mae" else 0
    return {"method": method, **({"windows": windows} if windows else {})}


def export_model(path: str | Path, **overrides) -> tuple[nn.Module, str | None]:
    """What ``lomar export`` writes of the checkpoint at ``path`` (:func:`~lomar.checkpoints.formats.load_model`'s
    model, but an original LoMaR / MAE pretraining checkpoint's encoder alone: its decoder's heads are not asked for),
    and the ``lomar pretrain --method`` of a pretraining checkpoint (None for a classifier, an encoder or a BEiT)."""
    reader, src = read(path)
    if isinstance(reader, DenseReader):  # a whole detector or segmenter: its encoder is no export of a run's
        raise whole_model_refusal(src.path, src.data)
    if isinstance(reader, (BEiTFinetuneReader, LinprobeReader)):  # a classifier on an encoder of no ViT export's
        what = ("a finetuned BEiT classifier (timm's Beit)" if isinstance(reader, BEiTFinetuneReader) else
                "a linear probe on its frozen encoder")
        start = ("the BEiT pretraining checkpoint it was finetuned from" if isinstance(reader, BEiTFinetuneReader)
                 else f"the encoder it probed ({src.data.get('pretrained', 'its --pretrained')})")
        raise ValueError(f"{src.path} is {what}, which an export (one encoder) does not hold; lomar.load_model reads "
                         f"it as it is, or export {start}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(reader, OriginalReader) and reader.method != "classifier":
        return reader.export_model(src, overrides), reader.method
    model = reader.model(src, overrides)
    return model, pretrain_method(model) if isinstance(model, (MAE, LoMaR)) else None


# ---- writing -------------------------------------------------------------------------------
def pretrain_checkpoint(model: nn.Module, source: str | None = None) -> dict:
    """Our checkpoint of a LoMaR / MAE model: ``{"model", "model_spec", "config", "format", "source"}``.

    ``model_spec`` rebuilds the model (:mod:`lomar.models.spec`); ``config`` holds the ``lomar
    pretrain`` settings that describe it (what a pretraining run saves), so the checkpoint reads
    like a run's for ``lomar export``, ``visualize``, ``knn`` and ``--pretrained``. A classifier is
    written as ``{"model", "model_spec", "vit_config", "num_classes", "format": "lomar-classifier-1"}``
    (``vit_config``: what lomar read before specs; a subclass from outside lomar.models, timm's, saves no spec).
    """
    vit = encoder_of(model).config
    if isinstance(model, VisionTransformer):
        try:
            spec = {"model_spec": model_spec(model)}
        except TypeError:
            spec = {}
        return {"model": model.state_dict(), **spec, "vit_config": vit.to_dict(), "num_classes": model.num_classes,
                "format": CLASSIFIER_FORMAT, "source": source}
    method = pretrain_method(model)
    spec = model_spec(model)
    shape = (vit.embed_dim, vit.depth, vit.num_heads)
    size = next((s for s, v in MODEL_SIZES.items() if v == shape), "base")
    patch = vit.patch_size if vit.patch_size in PATCH_SIZES else 16
    settings = dict(method=method, model=f"vit_{size}_patch{patch}",
                    embed_dim=vit.embed_dim, depth=vit.depth, num_heads=vit.num_heads, patch_size=vit.patch_size,
                    img_size=vit.img_size, pos=vit.pos, windows=0, **spec["args"])
    if "num_windows" in settings:
        settings["windows"] = settings.pop("num_windows")
    state = model.state_dict()
    build_from_spec(spec).load_state_dict(state, strict=True)  # proves the checkpoint rebuilds
    return {"model": state, "model_spec": spec, "config": settings, "format": PRETRAIN_FORMAT, "source": source}

