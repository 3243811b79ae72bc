"""The pieces of ViTDet's Mask R-CNN that torchvision's own do not give: one fixed input size (every image padded
at its bottom-right to ``size`` x ``size``, evaluation images resized to it), box coding in fp32, anchors at the
pyramid's own strides and RoIAlign over p2-p5 at scales fixed by their strides."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper

from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["FixedSizeTransform", "Fp32BoxCoder", "PyramidAnchors", "roi_pool", "ROI_LEVELS", "ROI_STRIDES"]

ROI_LEVELS = ["p2", "p3", "p4", "p5"]
ROI_STRIDES = (4, 8, 16, 32)  # of ROI_LEVELS, in input pixels


class FixedSizeTransform(GeneralizedRCNNTransform):
    """Normalise, resize for evaluation (longest side ``size``, antialiased; training images come jittered and
    are not resized again), and pad each image at its bottom-right into a ``size`` x ``size`` batch.
    Padding is 0 after normalisation, the mean pixel, as ViTDet's."""

    def __init__(self, size: int):
        super().__init__(size, size, list(IMAGENET_MEAN), list(IMAGENET_STD), size_divisible=32, _skip_resize=True)
        self.size = size

    def resize(self, image: torch.Tensor, target: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        if self.training or target is not None:
            return super().resize(image, target)
        # torchvision's own resize is bilinear without antialiasing: an image larger than the input would be
        # point-sampled (aliased), unlike the antialiased jitter the detector trains on
        height, width = image.shape[-2:]
        scale = self.size / max(height, width)
        size = [max(1, min(self.size, round(height * scale))), max(1, min(self.size, round(width * scale)))]
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0], None

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        too_big = [tuple(i.shape[-2:]) for i in images if max(i.shape[-2:]) > self.size]
        if too_big:
            raise ValueError(f"an image of {too_big[0]} px does not fit the {self.size} px input; crop or resize it")
        batch = images[0].new_zeros(len(images), images[0].shape[0], self.size, self.size)
        for image, slot in zip(images, batch):
            slot[:, :image.shape[1], :image.shape[2]].copy_(image)
        return batch


class Fp32BoxCoder(BoxCoder):
    """torchvision's ``BoxCoder``, encoding and decoding in fp32 whatever the heads' dtype. Under bf16 autocast
    (what ``--precision auto`` picks on a GPU) the RPN's and box head's deltas come in bf16, and ``BoxCoder`` casts
    the anchors and proposals to them: 8 significant bits, so every RoI coordinate from 512 to 1024 px lands on a
    grid of 4 px (2 px from 256) and each regression target is taken from a centre rounded as much. detectron2's
    ``Box2BoxTransform``, which ViTDet trains with under autocast, decodes in fp32 for that reason."""

    def encode_single(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        return super().encode_single(reference_boxes.float(), proposals.float())

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return super().decode_single(rel_codes.float(), boxes.float())


class PyramidAnchors(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` at the pyramid's own strides (``strides``, one a level). torchvision takes a
    level's stride as the input size // its grid, which p6 (p5 subsampled by 2, its last cell kept) misstates where
    the input is an odd multiple of 32: at 800 px its 13 cells lie 64 px apart but the anchors 61 (the last
    one 36 px off), at 96 px 48. detectron2's anchor generator takes the strides from the backbone."""

    def __init__(self, strides, sizes, aspect_ratios):
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(strides)

    def forward(self, image_list, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        grid_sizes = [feature_map.shape[-2:] for feature_map in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(stride, dtype=torch.int64, device=device)] * 2 for stride in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


def roi_pool(output_size: int) -> MultiScaleRoIAlign:
    """RoIAlign over ROI_LEVELS with the levels' scales fixed by their strides. torchvision infers them
    on its first call from that batch's largest unpadded image, and keeps them: here every image is
    padded to the fixed input size, so a first batch of small jittered images would fix wrong scales
    (1/2 for p2, say) for the whole run, and a resumed run could infer others."""
    pool = MultiScaleRoIAlign(ROI_LEVELS, output_size=output_size, sampling_ratio=0)
    pool.scales = [1 / stride for stride in ROI_STRIDES]
    levels = [stride.bit_length() - 1 for stride in ROI_STRIDES]  # log2: 2..5
    pool.map_levels = initLevelMapper(levels[0], levels[-1], canonical_scale=pool.canonical_scale,
                                      canonical_level=pool.canonical_level)
    return pool
