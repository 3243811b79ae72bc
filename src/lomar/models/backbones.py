"""The dense-prediction backbones' building blocks on a ViT encoder: ViTDet's simple feature pyramid, the
encoder's block outputs as maps, and the shape record detectron2's heads read. Reading an encoder from a checkpoint
or export is :mod:`lomar.integrations.dense`'s; docs/dense.md has the recipes.

The encoder runs on the whole image at any size whose sides are multiples of the patch size:
the contextual relative position encoding needs no interpolation (an MAE encoder's absolute
table is interpolated). For exact strides up to 32 use sides divisible by 32.
"""

from __future__ import annotations

import math

import torch
from timm.layers import LayerNorm2d  # LayerNorm over the channels of a (B, C, H, W) map, eps 1e-6
from torch import nn

from lomar.models.vit import VisionTransformer

__all__ = ["LayerNorm2d", "ShapeSpec", "SimpleFeaturePyramid", "feature_maps"]


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


class ShapeSpec(dict):
    """A level's ``{"channels", "stride"}``, read as detectron2 reads its own ShapeSpec too: its heads and FPN take
    ``output_shape()[name].channels`` and ``.stride``. Each of its four fields (channels, height, width, stride) is
    the value given or None, as there: ``ShapeSpec(channels=256, height=7, width=7)`` is a box head's input."""

    channels = property(lambda self: self.get("channels"))
    height = property(lambda self: self.get("height"))
    width = property(lambda self: self.get("width"))
    stride = property(lambda self: self.get("stride"))
