"""ViTDet's large-scale jitter of a detection sample (image, boxes and masks together), from torchvision's v2
transforms, and the evaluation transform; the samples come from :mod:`lomar.data.coco`."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["train_transforms", "eval_transforms", "crop_of_resized_masks"]


def crop_of_resized_masks(masks: torch.Tensor, size: tuple[int, int], top: int, left: int, height: int,
                          width: int, flip: bool = False) -> torch.Tensor:
    """``masks`` (N, H, W), contiguous, resized to ``size`` (H', W') by NEAREST_EXACT, then cropped to rows ``top``
    to ``top + height`` and columns ``left`` to ``left + width`` of the resized frame: (N, height, width), bit for
    bit ``TF.crop(TF.resize_image(masks, size, NEAREST_EXACT), top, left, height, width)`` for a window inside the
    frame, without making the (N, H', W') masks (90 objects of a 640 x 480 image at 2x jitter and 1024 px: 270 MiB
    for a 90 MiB crop). A nearest resize reads one source pixel per output pixel, so the crop gathers them: the
    columns (into (N, H, width)), then the rows; gather is 5x as fast as one advanced index of both on uint8.
    ``flip``: of the masks mirrored left to right first (``TF.horizontal_flip``), without that full-size copy: the
    mirror has the masks' shape and layout, so its resize reads the same columns c of it: columns W - 1 - c here."""
    rows = _nearest_sources(masks, size[0], dim=-2)[top:top + height]
    cols = _nearest_sources(masks, size[1], dim=-1)[left:left + width]
    if flip:
        cols = masks.shape[-1] - 1 - cols
    return masks.gather(-1, cols.expand(len(masks), masks.shape[-2], width)).index_select(-2, rows)


def _nearest_sources(masks: torch.Tensor, resized: int, dim: int) -> torch.Tensor:
    """(resized,) int64: the row (``dim`` -2) or column (-1) of ``masks`` that each of the ``resized`` ones of their
    NEAREST_EXACT resize reads. Taken from that resize of a ramp of the indices, not from a formula: torch rounds
    (i + 0.5) x in / out in float32 its own way (resized from 2 to 3571 rows, row 1785 reads row 1, which
    floor((i + 0.5) x float32(in / out)) puts at 0), by kernels it picks by device and layout (a single mask passes
    as channels-last), so the ramp has the masks' device and channel count (up to 2). float32, as torch computes the
    indices of uint8 masks in float32 (and casts bool masks to it): exact below 2**24."""
    length = masks.shape[dim]
    shape = [1, 1, 1, 1]
    shape[dim] = length
    ramp = torch.arange(length, dtype=torch.float32, device=masks.device).view(shape)
    shape[1] = min(max(len(masks), 1), 2)
    out = [1, 1]
    out[dim] = resized
    read = TF.resize_image(ramp.expand(shape).contiguous(), out, interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return read[0, 0].flatten().long()


class _FlipJitterAndCrop(v2.ScaleJitter):
    """ViTDet's horizontal flip (half the samples), large-scale jitter and fixed-size crop: resize to ``size`` x a
    random scale (aspect kept), then a random crop of at most ``size`` x ``size`` (a smaller image is left whole: the
    model pads every image to the fixed input size at its bottom-right, as ViTDet's FixedSizeCrop). One transform,
    so that masks are made at the crop only, flipped there (:func:`crop_of_resized_masks`); the draws are those of
    torchvision's RandomHorizontalFlip (one uniform number), then ScaleJitter's, then the crop's."""

    def __init__(self, size: int, scale_range: tuple[float, float]):
        super().__init__((size, size), scale_range=scale_range, antialias=True)
        self.crop_size = size

    def make_params(self, flat_inputs: list) -> dict:
        flip = bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip(0.5) leaves a sample whose draw is >= 0.5
        drawn = v2.ScaleJitter.make_params if hasattr(v2.ScaleJitter, "make_params") else v2.ScaleJitter._get_params
        height, width = drawn(self, flat_inputs)["size"]
        # each side at least 1 px: at the low end of the scale the short side of a strip (a 5 x 700 image at size
        # 1024) rounds to 0, which resize refuses (the loader worker failed)
        height, width = max(1, height), max(1, width)
        h, w = min(height, self.crop_size), min(width, self.crop_size)
        top = int(torch.randint(height - h + 1, ()))
        left = int(torch.randint(width - w + 1, ()))
        return {"flip": flip, "size": (height, width), "window": {"top": top, "left": left, "height": h, "width": w}}

    def transform(self, inpt, params: dict):
        if isinstance(inpt, tv_tensors.Mask):
            # torchvision resizes masks by NEAREST, which samples source pixel floor(x * in / out): at a scale that
            # is not a whole number the mask (and the box recomputed from it) lands up to half a pixel right of and
            # below the bilinear image; NEAREST_EXACT samples at pixel centres, as detectron2's PIL resize does
            cropped = crop_of_resized_masks(inpt.as_subclass(torch.Tensor), params["size"], **params["window"],
                                            flip=params["flip"])
            return tv_tensors.wrap(cropped, like=inpt)
        if params["flip"]:  # the image whole: its antialiased resize is no gather, and it is one mask's size x 3
            inpt = self._call_kernel(TF.horizontal_flip, inpt)
        return self._call_kernel(TF.crop, self._resize(inpt, params["size"]), **params["window"])

    def _resize(self, inpt, size: tuple[int, int]):
        if isinstance(inpt, tv_tensors.Image) and inpt.dtype == torch.uint8 and tuple(size) == (1, 1):
            # PyTorch's uint8 antialiased kernel fails an internal assert on a 1 x 1 output from 2 or more rows (any
            # image, where --jitter's LOW x --img-size < 2): the float kernel, rounded back as torchvision's fallback
            resized = TF.resize_image(inpt.as_subclass(torch.Tensor).float(), [1, 1], antialias=True)
            return tv_tensors.wrap(resized.round_().clamp_(0, 255).to(torch.uint8), like=inpt)
        resize = v2.ScaleJitter.transform if hasattr(v2.ScaleJitter, "transform") else v2.ScaleJitter._transform
        return resize(self, inpt, {"size": size})

    _get_params, _transform = make_params, transform  # torchvision < 0.21 calls these names


def _boxes_from_masks(image, target: dict):
    """ViTDet's ``recompute_boxes``: after the crop each box is its mask's extent (pixel edges, detectron2's
    ``BitMasks.get_bounding_boxes``), and an instance the crop emptied is dropped (box, mask and label; the masks
    are copied only then). From the rows and columns each mask touches, two passes over the masks: torchvision's
    ``masks_to_boxes`` (a ``where`` per mask) and ``SanitizeBoundingBoxes`` (which copies every mask) took 10x as
    long, about 1 s for 90 masks of 1024 x 1024."""
    masks = target["masks"]
    rows, cols = masks.any(-1).bool(), masks.any(-2).bool()  # (N, height), (N, width)
    filled = rows.any(-1)
    (top, bottom), (left, right) = _extent(rows), _extent(cols)
    boxes = torch.stack([left, top, right, bottom], -1) * filled[:, None]
    target["boxes"] = tv_tensors.wrap(boxes.to(target["boxes"].dtype), like=target["boxes"])
    if not filled.all():
        for key in ("boxes", "masks", "labels"):
            value = target[key]
            target[key] = tv_tensors.wrap(value[filled], like=value) if isinstance(value, tv_tensors.TVTensor) \
                else value[filled]
    return image, target


def _extent(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``hit`` (N, L) bool: the first index hit and one past the last, each (N,) (0 and L where none is)."""
    return hit.byte().argmax(-1), hit.shape[-1] - hit.flip(-1).byte().argmax(-1)


def train_transforms(size: int, scale_range: tuple[float, float] = (0.1, 2.0)) -> v2.Compose:
    """ViTDet's large-scale jitter on image, boxes and masks: flip, resize to ``size`` x a random
    scale in ``scale_range`` (aspect kept), crop to at most ``size``; boxes recomputed from the masks,
    emptied ones dropped."""
    return v2.Compose([
        _FlipJitterAndCrop(size, scale_range),
        _boxes_from_masks,
        *eval_transforms().transforms,
    ])


def eval_transforms() -> v2.Compose:
    """Images only, as float in [0, 1]: the model resizes (longest side to the input size) and pads."""
    return v2.Compose([v2.ToImage(), v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)])
