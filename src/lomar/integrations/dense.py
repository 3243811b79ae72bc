"""Dense prediction with a LoMaR encoder read from a checkpoint or export: the backbones of
:mod:`lomar.models.backbones` on any encoder source, the relative position term a recipe adds, and the layer-wise lr
decay parameter groups training uses. See docs/dense.md for the recipes."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lomar.checkpoints.convert import encoder_of
from lomar.checkpoints.formats import read
from lomar.checkpoints.formats_dense import DenseReader, whole_model_refusal
from lomar.models import backbones
from lomar.models.backbones import backbone_layout
from lomar.models.beit import BEiT
from lomar.models.vit import VisionTransformer

__all__ = ["ViTDetBackbone", "MultiLevelBackbone", "load_encoder", "backbone_encoder", "with_rel_pos",
           "layer_decay_param_groups"]


def load_encoder(source: str | Path | VisionTransformer) -> VisionTransformer:
    """An encoder from an export folder, any checkpoint (see ``lomar.checkpoints.formats.load_model``), a LoMaR or
    MAE model (its encoder), or as is; a BEiT one is refused with the ways it loads, a detector's or segmenter's
    checkpoint naming the encoder its run started from."""
    if isinstance(source, nn.Module):
        model, read_path = source, None
    else:
        reader, src = read(source)  # a run folder: the checkpoint every reader reads of it
        if isinstance(reader, DenseReader):  # a whole detector or segmenter, refused as every encoder reader does
            raise whole_model_refusal(src.path, src.data)
        model, read_path = reader.model(src, {}), src.path
    if isinstance(model, BEiT):
        # timm's local-dir: takes an export folder, which is what was read where a folder was
        folder = read_path is not None and Path(read_path).is_dir()
        raise TypeError(_BEIT_REFUSED.format(what="this model" if read_path is None else source,
                                             path=read_path if folder else "DIR"))
    return encoder_of(model)


# timm's Beit, which those load, has no place for the windowed layout and the relative position terms used here
_BEIT_REFUSED = ("{what} holds a BEiT encoder; lomar.dense takes LoMaR / MAE ViT encoders only (a lomar."
                 "VisionTransformer, a LoMaR or MAE model, their export folder or checkpoint). A BEiT export loads "
                 "as timm's Beit with timm.create_model('local-dir:{path}', pretrained=True) (a BEiT checkpoint: "
                 "lomar export it --to DIR first) or lomar.eval.features.load_pretrained_encoder")


def backbone_encoder(source: str | Path | VisionTransformer, window_size: int | None = None,
                     global_blocks=None, attention: str | None = None, rel_pos: str | None = None,
                     train_pos_embed: bool = True) -> VisionTransformer:
    """:func:`load_encoder`, laid out for a dense backbone (:func:`lomar.models.backbones.backbone_layout`: the
    arguments)."""
    return backbone_layout(load_encoder(source), window_size, global_blocks, attention, rel_pos, train_pos_embed)


def with_rel_pos(encoder: VisionTransformer, choice: str, recipe: str) -> VisionTransformer:
    """``encoder`` with the relative position term ``choice`` (none, decomposed, bias; auto: ``recipe``'s for
    an encoder without iRPE, none for a LoMaR one), zero-initialised where new. ValueError for a term on
    a LoMaR encoder, which has its own relative position."""
    if not isinstance(encoder, VisionTransformer):
        raise TypeError(f"with_rel_pos takes a lomar VisionTransformer (lomar.dense.load_encoder reads one from a "
                        f"checkpoint or export), got {type(encoder).__name__}")
    if choice == "auto":
        choice = "none" if encoder.config.pos == "rpe" else recipe
    if choice != "none" and encoder.config.pos == "rpe":
        raise ValueError(f"rel_pos {choice!r} is for encoders without iRPE (MAE's); a LoMaR encoder has its own "
                         f"relative position: use auto or none")
    return encoder if choice == encoder.config.rel_pos else backbone_layout(encoder, rel_pos=choice)


class ViTDetBackbone(backbones.ViTDetBackbone):
    """:class:`lomar.models.backbones.ViTDetBackbone` on ``encoder`` as :func:`load_encoder` reads it (an export
    folder, a checkpoint, a LoMaR or MAE model, or a VisionTransformer as is); the other arguments are its."""

    def __init__(self, encoder: str | Path | nn.Module, *args, **kwargs):
        super().__init__(load_encoder(encoder), *args, **kwargs)


class MultiLevelBackbone(backbones.MultiLevelBackbone):
    """:class:`lomar.models.backbones.MultiLevelBackbone` on ``encoder`` as :func:`load_encoder` reads it; the other
    arguments are its."""

    def __init__(self, encoder: str | Path | nn.Module, *args, **kwargs):
        super().__init__(load_encoder(encoder), *args, **kwargs)


def _encoder_layer(name: str, depth: int) -> int:
    """The layer id of an encoder parameter: 0 the stem, i + 1 block i, depth + 1 the final norm."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1 if name.startswith("norm.") else 0


def layer_decay_param_groups(model: nn.Module, encoder: VisionTransformer, weight_decay: float, layer_decay: float,
                             no_decay: set[int]) -> list[dict]:
    """AdamW groups of ``model``'s trainable parameters: ``encoder``'s of layer l at ``lr_scale`` =
    layer_decay^(depth + 1 - l), the others at 1; weight decay 0 for the parameters whose id is in
    ``no_decay``."""
    depth = len(encoder.blocks)
    scales = {id(p): layer_decay ** (depth + 1 - _encoder_layer(name, depth))
              for name, p in encoder.named_parameters()}
    groups: dict[tuple[float, float], list] = {}
    for param in model.parameters():
        if param.requires_grad:
            key = (scales.get(id(param), 1.0), 0.0 if id(param) in no_decay else weight_decay)
            groups.setdefault(key, []).append(param)
    return [{"params": params, "lr_scale": scale, "weight_decay": decay}
            for (scale, decay), params in sorted(groups.items())]
