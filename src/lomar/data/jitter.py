"""ViTDet's large-scale jitter of a detection sample (image, boxes and masks together), from torchvision's v2
transforms, and the evaluation transform; the samples come from :mod:`lomar.data.coco`."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["train_transforms", "eval_transforms"]


class _CropAtMost(v2.Transform):
    """A random crop of at most ``size`` x ``size`` (a smaller image is left whole): the model
    pads every image to the fixed input size at its bottom-right, as ViTDet's FixedSizeCrop."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        h, w = min(height, self.size), min(width, self.size)
        top = int(torch.randint(height - h + 1, ()))
        left = int(torch.randint(width - w + 1, ()))
        return {"top": top, "left": left, "height": h, "width": w}

    def transform(self, inpt, params: dict):
        return self._call_kernel(TF.crop, inpt, **params)

    _get_params, _transform = make_params, transform  # torchvision < 0.21 calls these names


class _ScaleJitter(v2.ScaleJitter):
    """torchvision's, each side at least 1 px: at the low end of the scale the short side of a strip
    (a 5 x 700 image at size 1024) rounds to 0, which resize refuses (the loader worker failed)."""

    def make_params(self, flat_inputs: list) -> dict:
        drawn = v2.ScaleJitter.make_params if hasattr(v2.ScaleJitter, "make_params") else v2.ScaleJitter._get_params
        height, width = drawn(self, flat_inputs)["size"]
        return {"size": (max(1, height), max(1, width))}

    def transform(self, inpt, params: dict):
        if isinstance(inpt, tv_tensors.Mask):
            # torchvision resizes masks by NEAREST, which samples source pixel floor(x * in / out): at a scale that
            # is not a whole number the mask (and the box recomputed from it) lands up to half a pixel right of and
            # below the bilinear image; NEAREST_EXACT samples at pixel centres, as detectron2's PIL resize does
            resized = TF.resize_image(inpt.as_subclass(torch.Tensor), list(params["size"]),
                                      interpolation=v2.InterpolationMode.NEAREST_EXACT)
            return tv_tensors.wrap(resized, like=inpt)
        if isinstance(inpt, tv_tensors.Image) and inpt.dtype == torch.uint8 and tuple(params["size"]) == (1, 1):
            # PyTorch's uint8 antialiased kernel fails an internal assert on a 1 x 1 output from 2 or more rows (any
            # image, where --jitter's LOW x --img-size < 2): the float kernel, rounded back as torchvision's fallback
            resized = TF.resize_image(inpt.as_subclass(torch.Tensor).float(), [1, 1], antialias=True)
            return tv_tensors.wrap(resized.round_().clamp_(0, 255).to(torch.uint8), like=inpt)
        resize = v2.ScaleJitter.transform if hasattr(v2.ScaleJitter, "transform") else v2.ScaleJitter._transform
        return resize(self, inpt, params)

    _get_params, _transform = make_params, transform  # torchvision < 0.21 calls these names


def _boxes_from_masks(image, target: dict):
    """ViTDet's ``recompute_boxes``: after the crop each box is its mask's extent (pixel edges, detectron2's
    ``BitMasks.get_bounding_boxes``); a mask the crop emptied leaves an empty box, which is then dropped."""
    masks, boxes = target["masks"], torch.zeros(len(target["masks"]), 4)
    filled = masks.flatten(1).bool().any(1)
    if filled.any():
        extent = masks_to_boxes(masks[filled])
        extent[:, 2:] += 1
        boxes[filled] = extent
    target["boxes"] = tv_tensors.wrap(boxes.to(target["boxes"].dtype), like=target["boxes"])
    return image, target


def train_transforms(size: int, scale_range: tuple[float, float] = (0.1, 2.0)) -> v2.Compose:
    """ViTDet's large-scale jitter on image, boxes and masks: flip, resize to ``size`` x a random
    scale in ``scale_range`` (aspect kept), crop to at most ``size``; boxes recomputed from the masks,
    emptied ones dropped."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        _ScaleJitter((size, size), scale_range=scale_range, antialias=True),
        _CropAtMost(size),
        _boxes_from_masks,
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0),
        *eval_transforms().transforms,
    ])


def eval_transforms() -> v2.Compose:
    """Images only, as float in [0, 1]: the model resizes (longest side to the input size) and pads."""
    return v2.Compose([v2.ToImage(), v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)])
