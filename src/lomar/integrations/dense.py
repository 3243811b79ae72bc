"""Dense prediction with a LoMaR encoder: ViTDet's simple feature pyramid, and backbones for
detectron2 (ViTDet) and mmsegmentation (UperNet). See docs/dense.md for the recipes.

The encoder runs on the whole image at any size whose sides are multiples of the patch size:
the contextual relative position encoding needs no interpolation (an MAE encoder's absolute
table is interpolated). For exact strides up to 32 use sides divisible by 32.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lomar.checkpoints.convert import encoder_of
from lomar.checkpoints.formats import load_model
from lomar.models.backbones import ShapeSpec, SimpleFeaturePyramid, feature_maps
from lomar.models.beit import BEiT
from lomar.models.relpos import fit_axis_tables
from lomar.models.vit import VisionTransformer

__all__ = ["ViTDetBackbone", "MultiLevelBackbone", "load_encoder", "backbone_encoder", "with_rel_pos",
           "layer_decay_param_groups"]


def load_encoder(source: str | Path | VisionTransformer) -> VisionTransformer:
    """An encoder from an export folder, any checkpoint (see ``lomar.checkpoints.formats.load_model``), a LoMaR or
    MAE model (its encoder), or as is; a BEiT one is refused with the ways it loads."""
    model = source if isinstance(source, nn.Module) else load_model(source)
    if isinstance(model, BEiT):
        folder = not isinstance(source, nn.Module) and Path(source).is_dir()
        raise TypeError(_BEIT_REFUSED.format(what="this model" if isinstance(source, nn.Module) else source,
                                             path=source if folder else "DIR"))
    return encoder_of(model)


# timm's Beit, which those load, has no place for the windowed layout and the relative position terms used here
_BEIT_REFUSED = ("{what} holds a BEiT encoder; lomar.dense takes LoMaR / MAE ViT encoders only (a lomar."
                 "VisionTransformer, a LoMaR or MAE model, their export folder or checkpoint). A BEiT export loads "
                 "as timm's Beit with timm.create_model('local-dir:{path}', pretrained=True) (a BEiT checkpoint: "
                 "lomar export it --to DIR first) or lomar.eval.features.load_pretrained_encoder")


def backbone_encoder(source: str | Path | VisionTransformer, window_size: int | None = None,
                     global_blocks=None, attention: str | None = None, rel_pos: str | None = None,
                     train_pos_embed: bool = True) -> VisionTransformer:
    """:func:`load_encoder` without a classifier's head and fc_norm, with the given attention
    layout (None keeps the encoder's): ``window_size`` > 0 for ViTDet-style windowed blocks
    except ``global_blocks``; ``attention`` auto/dense/chunked/flex; ``rel_pos`` a relative position
    term (:func:`with_rel_pos`; a new one starts at zero, trained per-axis tables are resampled to new
    window sizes). An absolute position table is trained, as MAE's finetuning does (its pretraining
    froze it), unless ``train_pos_embed`` is False."""
    encoder = load_encoder(source)
    changes = {k: v for k, v in dict(window_size=window_size, attention=attention, rel_pos=rel_pos,
                                     global_blocks=None if global_blocks is None else tuple(global_blocks)).items()
               if v is not None}
    if encoder.num_classes or any(getattr(encoder.config, k) != v for k, v in changes.items()):
        plain = VisionTransformer(replace(encoder.config, **changes))
        shapes = {k: v.shape for k, v in plain.state_dict().items()}
        plain.load_state_dict(fit_axis_tables(encoder.state_dict(), shapes), strict=False)
        plain.set_grad_checkpointing(encoder.grad_checkpointing)
        frozen = {name for name, param in encoder.named_parameters() if not param.requires_grad}
        for name, param in plain.named_parameters():  # a frozen encoder stays frozen (new tables train)
            param.requires_grad_(name not in frozen)
        encoder = plain.to(encoder.cls_token.device, encoder.cls_token.dtype).train(encoder.training)
    if encoder.pos_embed is not None:
        encoder.pos_embed.requires_grad_(train_pos_embed)
    return encoder


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
    return encoder if choice == encoder.config.rel_pos else backbone_encoder(encoder, rel_pos=choice)


class ViTDetBackbone(nn.Module):
    """Encoder + :class:`SimpleFeaturePyramid` from its last block: images -> {"p2".."p5"[, "p6"]}.

    Follows detectron2's ``Backbone`` protocol (``output_shape()``, ``size_divisibility``,
    ``padding_constraints``, ``_out_features``) without importing detectron2 (not tested with it:
    docs/dense.md, "Other toolkits"). ``window_size`` /
    ``global_blocks`` / ``attention`` / ``train_pos_embed``: see :func:`backbone_encoder` (ViTDet: 14,
    (2, 5, 8, 11)).
    """

    def __init__(self, encoder: VisionTransformer | str | Path, out_channels: int = 256,
                 scale_factors=(4.0, 2.0, 1.0, 0.5), top_block: bool = False, norm: bool = True,
                 grad_checkpointing: bool = False, square_pad: int = 0, window_size: int | None = None,
                 global_blocks=None, attention: str | None = None, train_pos_embed: bool = True):
        super().__init__()
        self.encoder = backbone_encoder(encoder, window_size, global_blocks, attention,
                                        train_pos_embed=train_pos_embed)
        self.pyramid = SimpleFeaturePyramid(self.encoder.embed_dim, out_channels, scale_factors,
                                            in_stride=self.encoder.config.patch_size, top_block=top_block)
        self.norm = norm
        self.grad_checkpointing = grad_checkpointing
        self._square_pad = square_pad
        self._out_features = list(self.pyramid.strides)
        self._out_feature_strides = dict(self.pyramid.strides)
        self._out_feature_channels = {name: out_channels for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        """Pad inputs to a multiple of this: the coarsest stride (the patch size suffices for the encoder)."""
        return max(self._out_feature_strides.values())

    @property
    def padding_constraints(self) -> dict:
        return {"size_divisiblity": self.size_divisibility, "square_size": self._square_pad}

    def output_shape(self) -> dict[str, ShapeSpec]:
        """{name: {"channels", "stride"}}, each also ``.channels`` and ``.stride`` (:class:`ShapeSpec`), as detectron2's
        Backbone gives them: its consumers read the attributes, and wrap nothing."""
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W), H and W multiples of the patch size -> {name: (B, C, H/stride, W/stride)}."""
        (last,) = feature_maps(self.encoder, images, (-1,), self.norm, self.grad_checkpointing and self.training)
        return self.pyramid(last)


class MultiLevelBackbone(nn.Module):
    """Maps of several blocks, all at stride p: images -> tuple of (B, D, H/p, W/p).

    The backbone mmsegmentation's ViT/MAE recipes expect (``out_indices`` (3, 5, 7, 11) of a
    12-block encoder), to be followed by its ``MultiLevelNeck`` (rescales to strides 4-32) and
    ``UPerHead``. With ``pyramid=True`` the maps are instead rescaled here by 4, 2, 1, 0.5
    (transposed convs / max pool, BEiT-style), so a plain UPerHead can follow directly. The layout
    settings and ``train_pos_embed``: see :func:`backbone_encoder`.
    """

    def __init__(self, encoder: VisionTransformer | str | Path, out_indices=(3, 5, 7, 11), norm: bool = False,
                 pyramid: bool = False, grad_checkpointing: bool = False, window_size: int | None = None,
                 global_blocks=None, attention: str | None = None, train_pos_embed: bool = True):
        super().__init__()
        self.encoder = backbone_encoder(encoder, window_size, global_blocks, attention,
                                        train_pos_embed=train_pos_embed)
        depth = len(self.encoder.blocks)
        indices = () if isinstance(out_indices, (str, bytes)) or not hasattr(out_indices, "__iter__") else tuple(
            out_indices)
        if not indices or any(not isinstance(i, int) or isinstance(i, bool) for i in indices):
            raise ValueError(f"out_indices must be a sequence of block indices (integers), got {out_indices!r}")
        if any(not -depth <= i < depth for i in indices):
            raise ValueError(f"out_indices {indices} out of range for a {depth}-block encoder")
        self.out_indices = indices
        self.norm = norm
        self.grad_checkpointing = grad_checkpointing
        dim = self.encoder.embed_dim
        self.rescale = None
        if pyramid:
            if len(self.out_indices) != 4:
                raise ValueError("pyramid=True needs exactly four out_indices (strides 4, 8, 16, 32)")
            self.rescale = nn.ModuleList([
                nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                              nn.ConvTranspose2d(dim, dim, 2, stride=2)),
                nn.ConvTranspose2d(dim, dim, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, stride=2),
            ])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = feature_maps(self.encoder, images, self.out_indices, self.norm,
                            self.grad_checkpointing and self.training)
        if self.rescale is not None:
            maps = [op(m) for op, m in zip(self.rescale, maps)]
        return tuple(maps)


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
