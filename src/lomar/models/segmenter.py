"""UperNet on a ViT encoder, as mmsegmentation's MAE / BEiT ADE20K recipes build it: the maps of
four blocks (3/5/7/11 of 12), rescaled to strides 4/8/16/32 (``Feature2Pyramid``: transposed
convs, identity, max pool), a :class:`~lomar.models.upernet.UPerHead` on all four and an auxiliary
:class:`~lomar.models.upernet.FCNHead` on the stride-16 map (loss weight 0.4), and their losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lomar.models.backbones import MultiLevelBackbone, spread_indices
from lomar.models.spec import BuiltOnEncoder
from lomar.models.upernet import FCNHead, UPerHead
from lomar.models.vit import VisionTransformer

__all__ = ["UperNetSegmenter", "segmentation_losses"]


class UperNetSegmenter(BuiltOnEncoder, nn.Module):
    """images (B, 3, H, W), sides multiples of ``size_divisor`` (twice the patch) -> logits (B, num_classes, H, W).

    ``out_indices``: blocks feeding the pyramid (default :func:`spread_indices`); ``channels``:
    the head's width (768 in mmseg's ViT-B recipe); ``aux_weight``: 0 drops the auxiliary head;
    ``train_pos_embed`` False keeps an absolute position table fixed. Its model spec: the encoder's ViTConfig and
    :meth:`spec_args`.
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int, out_indices=None, channels: int = 768,
                 aux_channels: int = 256, aux_weight: float = 0.4, grad_checkpointing: bool = False,
                 train_pos_embed: bool = True):
        super().__init__()
        depth = len(encoder.blocks)
        self.backbone = MultiLevelBackbone(encoder, out_indices or spread_indices(depth), pyramid=True,
                                           grad_checkpointing=grad_checkpointing, train_pos_embed=train_pos_embed)
        dim = self.backbone.encoder.embed_dim
        self.num_classes = num_classes
        # the coarsest pyramid stride (max pool of the patch grid): a whole image padded to a multiple of it maps
        # onto every level exactly; 32 for patch 16, mmseg's size divisor
        self.size_divisor = 2 * self.backbone.encoder.config.patch_size
        self.decode_head = UPerHead([dim] * 4, num_classes, channels)
        self.aux_weight = aux_weight
        self.aux_head = FCNHead(dim, num_classes, aux_channels) if aux_weight else None

    @property
    def encoder(self) -> VisionTransformer:
        return self.backbone.encoder

    def spec_args(self) -> dict:
        """The constructor's arguments beyond the encoder that shape the model, read off its parts
        (``grad_checkpointing`` and ``train_pos_embed`` change neither; without an auxiliary head, no aux_channels)."""
        args = {"num_classes": self.num_classes, "out_indices": list(self.backbone.out_indices),
                "channels": self.decode_head.classifier.in_channels, "aux_weight": self.aux_weight}
        if self.aux_head is not None:
            args["aux_channels"] = self.aux_head.classifier.in_channels
        return args

    def forward(self, images: torch.Tensor, aux: bool = False):
        """Logits (B, N, H, W); with ``aux`` also the auxiliary head's, both upsampled to the input."""
        levels = self.backbone(images)
        size = images.shape[-2:]
        logits = F.interpolate(self.decode_head(list(levels)), size=size, mode="bilinear", align_corners=False)
        if not aux:
            return logits
        extra = None
        if self.aux_head is not None:
            extra = F.interpolate(self.aux_head(levels[2]), size=size, mode="bilinear", align_corners=False)
        return logits, extra

    def loss(self, images: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """Cross-entropy of the decode head plus ``aux_weight`` x the auxiliary head's; labels (B, H, W)
        long, 0..N-1 or ``ignore_index``."""
        return sum(segmentation_losses(*self(images, aux=True), labels, self.aux_weight, ignore_index).values())


def segmentation_losses(logits: torch.Tensor, extra: torch.Tensor | None, labels: torch.Tensor, aux_weight: float,
                        ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """The terms of :meth:`UperNetSegmenter.loss` from the outputs of ``forward(images, aux=True)``: logits
    and ``extra`` (B, N, H, W), labels (B, H, W); apart, so that a DDP wrapper's forward computes them.
    ``loss_decode``, and with the auxiliary head ``loss_aux`` (its cross-entropy x ``aux_weight``)."""
    losses = {"loss_decode": _pixel_mean_loss(logits, labels, ignore_index)}
    if extra is not None:
        losses["loss_aux"] = aux_weight * _pixel_mean_loss(extra, labels, ignore_index)
    return losses


def _pixel_mean_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # mmseg's default (avg_non_ignore=False): the mean over every pixel, an ignored one counting 0, so that a
    # batch without a labelled pixel gives 0 where a mean over the labelled ones would give NaN
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum") / labels.numel()
