"""Dense-prediction backbones on a ViT encoder: ViTDet's simple feature pyramid, the encoder's block outputs as
maps, and the backbones for detectron2 (ViTDet) and mmsegmentation (UperNet) on an encoder given. Reading the encoder
from a checkpoint or export is :mod:`lomar.integrations.dense`'s; docs/dense.md has the recipes.

The encoder runs on the whole image at any size whose sides are multiples of the patch size:
the contextual relative position encoding needs no interpolation (an MAE encoder's absolute
table is interpolated). For exact strides up to 32 use sides divisible by 32.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from timm.layers import LayerNorm2d  # LayerNorm over the channels of a (B, C, H, W) map, eps 1e-6
from torch import nn

from lomar.models.relpos import fit_axis_tables
from lomar.models.vit import VisionTransformer

__all__ = ["LayerNorm2d", "ShapeSpec", "SimpleFeaturePyramid", "feature_maps", "backbone_layout", "ViTDetBackbone",
           "MultiLevelBackbone", "spread_indices"]


def _conv_norm(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), LayerNorm2d(cout))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet-style pyramid from one stride-``in_stride`` map (Li et al., 2022).

    Each scale factor s gives one level: s=4 two stride-2 transposed convs (LayerNorm + GELU
    between), s=2 one, s=1 the map itself, s=0.5 a 2×2 max pool; then a 1×1 conv to
    ``out_channels`` and a 3×3 conv, each followed by a channel LayerNorm. Levels are named
    ``p{log2(stride)}``: for patch 16 and the default factors, ``p2, p3, p4, p5`` at strides 4,
    8, 16, 32 (detectron2's names); ``top_block`` adds ``p6`` (stride-2 subsampling of p5, as
    detectron2's LastLevelMaxPool).

    forward: (B, in_channels, h, w) -> {name: (B, out_channels, h·s, w·s)}.
    """

    def __init__(self, in_channels: int, out_channels: int = 256, scale_factors=(4.0, 2.0, 1.0, 0.5),
                 in_stride: int = 16, top_block: bool = False):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer (channels), got {value!r}")
        self.scale_factors = tuple(float(s) for s in scale_factors)
        if not self.scale_factors or len(set(self.scale_factors)) < len(self.scale_factors):  # one level per name
            raise ValueError(f"scale_factors must be distinct factors among 4, 2, 1 and 0.5, at least one, got "
                             f"{tuple(scale_factors)!r}")
        if not isinstance(in_stride, int) or isinstance(in_stride, bool) or in_stride < 1:
            raise ValueError(f"in_stride must be a positive integer (the map's stride: the patch size), got "
                             f"{in_stride!r}")
        if (least := max((int(s) for s in self.scale_factors if s in (4.0, 2.0)), default=1)) > in_channels:
            # 4 upsamples into in_channels // 4 channels, 2 into in_channels // 2
            raise ValueError(f"scale factor {least} upsamples into in_channels // {least} channels: in_channels must "
                             f"be at least {least}, got {in_channels}")
        self.in_channels, self.in_stride = in_channels, in_stride
        self.out_channels = out_channels
        self.top_block = top_block
        self.stages = nn.ModuleList()
        self.strides: dict[str, int] = {}
        for scale in self.scale_factors:
            dim = in_channels
            if scale == 4.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
                dim //= 4
            elif scale == 2.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)]
                dim //= 2
            elif scale == 1.0:
                layers = []
            elif scale == 0.5:
                layers = [nn.MaxPool2d(2, stride=2)]
            else:
                raise ValueError(f"scale factor {scale} not supported; use 4, 2, 1 or 0.5")
            layers += [_conv_norm(dim, out_channels, 1), _conv_norm(out_channels, out_channels, 3)]
            self.stages.append(nn.Sequential(*layers))
            stride = in_stride / scale
            if stride != int(stride) or int(stride) & (int(stride) - 1):
                raise ValueError(f"input stride {in_stride} with scale {scale} gives stride {stride}, "
                                 f"not a power of two")
            self.strides[f"p{int(math.log2(stride))}"] = int(stride)
        if top_block:
            last = max(self.strides.values())
            self.strides[f"p{int(math.log2(last)) + 1}"] = 2 * last

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SimpleFeaturePyramid takes a map (B, {self.in_channels}, h, w), got {tuple(x.shape)}; "
                             f"an encoder's tokens (B, 1+h·w, D) become one with lomar.dense.feature_maps")
        names = list(self.strides)
        out = {name: stage(x) for name, stage in zip(names, self.stages)}
        if self.top_block:
            coarsest = max(out, key=self.strides.__getitem__)
            out[names[-1]] = nn.functional.max_pool2d(out[coarsest], kernel_size=1, stride=2)
        return out


def feature_maps(encoder: VisionTransformer, images: torch.Tensor, indices=(-1,), norm: bool = True,
                 grad_checkpointing: bool = False) -> list[torch.Tensor]:
    """Block outputs of the encoder as (B, D, H/p, W/p) maps (cls dropped).

    indices: block indices (negative from the end); ``norm`` applies the encoder's final
    LayerNorm to each map; ``grad_checkpointing`` trades compute for memory while training
    (False leaves the encoder's own flag in charge).
    """
    depth = len(encoder.blocks)
    indices = (indices,) if isinstance(indices, int) else tuple(indices)
    if not indices or any(not isinstance(i, int) or not -depth <= i < depth for i in indices):
        raise ValueError(f"indices {indices} must be block indices in [{-depth}, {depth - 1}] of this "
                         f"{depth}-block encoder (negative from the end), at least one")
    take = sorted({i % depth for i in indices})
    tokens, grid = encoder.embed(images)
    out = {}
    for i, x in encoder.iter_blocks(tokens, grid, grad_checkpointing=grad_checkpointing or None,
                                    stop=take[-1] + 1):
        if i in take:
            y = encoder.norm(x) if norm else x
            out[i] = y[:, 1:].transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
    return [out[i % depth] for i in indices]


def _check_halvable(images: torch.Tensor, stride: int) -> None:
    """ValueError unless each side of images (B, 3, H, W) spans two of the ``stride``-pixel map's cells: a pyramid's
    coarsest level max-pools that map by 2, and a side of one cell would pool to nothing (torch's "Output size is too
    small")."""
    if images.ndim != 4:  # the encoder names the shape it takes
        return
    height, width = images.shape[-2:]
    if height < 2 * stride or width < 2 * stride:
        raise ValueError(f"image size {height}x{width} is below the least this pyramid takes, {2 * stride} a side (its "
                         f"stride-{2 * stride} level halves the map of {stride}-pixel patches); pad each side to a "
                         f"multiple of {2 * stride}")


class ShapeSpec(dict):
    """A level's ``{"channels", "stride"}``, read as detectron2 reads its own ShapeSpec too: its heads and FPN take
    ``output_shape()[name].channels`` and ``.stride``. Each of its four fields (channels, height, width, stride) is
    the value given or None, as there: ``ShapeSpec(channels=256, height=7, width=7)`` is a box head's input."""

    channels = property(lambda self: self.get("channels"))
    height = property(lambda self: self.get("height"))
    width = property(lambda self: self.get("width"))
    stride = property(lambda self: self.get("stride"))


def backbone_layout(encoder: VisionTransformer, window_size: int | None = None, global_blocks=None,
                    attention: str | None = None, rel_pos: str | None = None,
                    train_pos_embed: bool = True) -> VisionTransformer:
    """``encoder`` without a classifier's head and fc_norm, with the given attention
    layout (None keeps the encoder's): ``window_size`` > 0 for ViTDet-style windowed blocks
    except ``global_blocks``; ``attention`` auto/dense/chunked/flex; ``rel_pos`` a relative position
    term (a new one starts at zero, trained per-axis tables are resampled to new
    window sizes). An absolute position table is trained, as MAE's finetuning does (its pretraining
    froze it), unless ``train_pos_embed`` is False. TypeError for anything but a lomar VisionTransformer."""
    if not isinstance(encoder, VisionTransformer):
        raise TypeError(f"a dense backbone takes a lomar VisionTransformer, got {type(encoder).__name__}; "
                        f"lomar.dense.load_encoder reads one from a checkpoint, an export or a LoMaR / MAE model")
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


class ViTDetBackbone(nn.Module):
    """Encoder + :class:`SimpleFeaturePyramid` from its last block: images -> {"p2".."p5"[, "p6"]}.

    Follows detectron2's ``Backbone`` protocol (``output_shape()``, ``size_divisibility``,
    ``padding_constraints``, ``_out_features``) without importing detectron2 (not tested with it:
    docs/dense.md, "Other toolkits"), and has the ``out_channels`` torchvision's detectors read. ``window_size`` /
    ``global_blocks`` / ``attention`` / ``train_pos_embed``: see :func:`backbone_layout` (ViTDet: 14,
    (2, 5, 8, 11)).
    """

    def __init__(self, encoder: VisionTransformer, out_channels: int = 256,
                 scale_factors=(4.0, 2.0, 1.0, 0.5), top_block: bool = False, norm: bool = True,
                 grad_checkpointing: bool = False, square_pad: int = 0, window_size: int | None = None,
                 global_blocks=None, attention: str | None = None, train_pos_embed: bool = True):
        super().__init__()
        self.encoder = backbone_layout(encoder, window_size, global_blocks, attention,
                                       train_pos_embed=train_pos_embed)
        self.pyramid = SimpleFeaturePyramid(self.encoder.embed_dim, out_channels, scale_factors,
                                            in_stride=self.encoder.config.patch_size, top_block=top_block)
        self.norm = norm
        self.grad_checkpointing = grad_checkpointing
        self._square_pad = square_pad
        self._out_features = list(self.pyramid.strides)
        self._out_feature_strides = dict(self.pyramid.strides)
        self._out_feature_channels = {name: out_channels for name in self._out_features}
        self.out_channels = out_channels  # what torchvision's detectors read off a backbone, every level's alike

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
        """(B, 3, H, W), H and W multiples of the patch size (with the 0.5 scale, at least twice it) ->
        {name: (B, C, H/stride, W/stride)}."""
        if 0.5 in self.pyramid.scale_factors:
            _check_halvable(images, self.pyramid.in_stride)
        (last,) = feature_maps(self.encoder, images, (-1,), self.norm, self.grad_checkpointing and self.training)
        return self.pyramid(last)


def spread_indices(depth: int) -> tuple[int, ...]:
    """The blocks whose maps feed the pyramid: (3, 5, 7, 11) for depth 12, (7, 11, 15, 23) for 24
    (mmseg's choices), the same fractions (1/3, 1/2, 2/3, 1 of the depth) for any other."""
    return tuple(max(0, round(depth * k / 12) - 1) for k in (4, 6, 8, 12))


class MultiLevelBackbone(nn.Module):
    """Maps of several blocks, all at stride p: images -> tuple of (B, D, H/p, W/p).

    The backbone mmsegmentation's ViT/MAE recipes expect (``out_indices`` (3, 5, 7, 11) of a
    12-block encoder), to be followed by its ``MultiLevelNeck`` (rescales to strides 4-32) and
    ``UPerHead``. With ``pyramid=True`` the maps are instead rescaled here by 4, 2, 1, 0.5
    (transposed convs / max pool, BEiT-style), so a plain UPerHead can follow directly. The layout
    settings and ``train_pos_embed``: see :func:`backbone_layout`.
    """

    def __init__(self, encoder: VisionTransformer, out_indices=(3, 5, 7, 11), norm: bool = False,
                 pyramid: bool = False, grad_checkpointing: bool = False, window_size: int | None = None,
                 global_blocks=None, attention: str | None = None, train_pos_embed: bool = True):
        super().__init__()
        self.encoder = backbone_layout(encoder, window_size, global_blocks, attention,
                                       train_pos_embed=train_pos_embed)
        depth = len(self.encoder.blocks)
        indices = () if isinstance(out_indices, (str, bytes)) or not hasattr(out_indices, "__iter__") else tuple(
            out_indices)
        if not indices or any(not isinstance(i, int) or isinstance(i, bool) for i in indices):
            raise ValueError(f"out_indices must be a sequence of block indices (integers), got {out_indices!r}")
        if any(not -depth <= i < depth for i in indices):
            # timm's forward_intermediates(indices=[...]) convention: a negative index counts back from the last block
            raise ValueError(f"out_indices {indices} out of range for a {depth}-block encoder; pass blocks in "
                             f"{-depth}..{depth - 1} (negative from the last block, as timm takes them), e.g. "
                             f"out_indices={spread_indices(depth)} (a third, half, two thirds and all of the depth, "
                             f"as lomar segment takes them)")
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
        """(B, 3, H, W), H and W multiples of the patch size (with ``pyramid``, at least twice it) -> the maps."""
        if self.rescale is not None:
            _check_halvable(images, self.encoder.config.patch_size)
        maps = feature_maps(self.encoder, images, self.out_indices, self.norm,
                            self.grad_checkpointing and self.training)
        if self.rescale is not None:
            maps = [op(m) for op, m in zip(self.rescale, maps)]
        return tuple(maps)
