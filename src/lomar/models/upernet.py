"""UperNet's decode head (Xiao et al., 2018) as mmsegmentation's ``UPerHead`` builds it, and the
auxiliary ``FCNHead`` its ViT recipes train beside it.

UPerHead: a pyramid pooling module (PPM) on the coarsest level, a top-down FPN over the others,
all levels upsampled to the finest one, concatenated, fused by a 3x3 conv and classified by a
1x1 conv (dropout 0.1 before it). Every conv is conv (no bias) + BatchNorm + ReLU, as mmseg's
``ConvModule`` with ``norm_cfg=BN``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "PyramidPooling", "UPerHead", "FCNHead"]


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's module: (B, C, h, w) -> the input and its adaptive average pools to s x s for each
    scale s, each reduced to ``channels`` and upsampled back: a list of 1 + len(scales) maps."""

    def __init__(self, in_channels: int, channels: int, scales=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels))
                                    for s in scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x] + [_resize(stage(x), x.shape[-2:]) for stage in self.stages]


class UPerHead(nn.Module):
    """levels: list of (B, C_i, h_i, w_i), finest first -> logits (B, num_classes, h_0, w_0)."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 512, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(ConvBNReLU(c, channels) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral, levels)]
        laterals.append(self.bottleneck(torch.cat(self.ppm(levels[-1]), dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level gets the coarser one added
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(x, size) for x in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: (B, C, h, w) -> one 3x3 ConvBNReLU -> dropout -> 1x1 conv -> (B, num_classes, h, w)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))
