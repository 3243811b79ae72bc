"""ViTDet's large-scale jitter on inputs at the edge of what COCO files hold."""

import pytest
import torch
from torchvision import tv_tensors

from lomar.data.jitter import train_transforms


def test_a_strip_scaled_to_under_a_pixel_keeps_one():
    # 5 x 700 at size 1024 and scale 0.1: the short side is 0.73 px, which resize refused
    height, width = 5, 700
    image = tv_tensors.Image(torch.full((3, height, width), 128, dtype=torch.uint8))
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    masks[0, :, 100:400] = 1
    target = {"boxes": tv_tensors.BoundingBoxes([[100, 0, 400, height]], format="XYXY", canvas_size=(height, width)),
              "masks": tv_tensors.Mask(masks), "labels": torch.tensor([1])}
    out, target = train_transforms(1024, (0.1, 0.1))(image, target)
    assert out.shape == (3, 1, 102) and out.dtype == torch.float32
    assert target["masks"].shape[1:] == (1, 102) and len(target["boxes"]) == len(target["labels"])



@pytest.mark.parametrize("scale", [0.45, 0.55, 0.7])
def test_masks_stay_on_the_image_through_a_fractional_rescale(scale):
    # torchvision's NEAREST put the mask up to half a pixel right of and below the bilinear image: 36-63 pixels of
    # a 700-1600 pixel square disagreed with the image's own (> 50 %) pixels
    height, width = 100, 120
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    masks[0, 30:61, 41:80] = 1
    image = tv_tensors.Image(masks.expand(3, -1, -1) * 255)
    target = {"boxes": tv_tensors.BoundingBoxes([[41, 30, 80, 61]], format="XYXY", canvas_size=(height, width)),
              "masks": tv_tensors.Mask(masks), "labels": torch.tensor([1])}
    out, target = train_transforms(200, (scale, scale))(image, target)
    assert max(out.shape[-2:]) < 200  # resized, not cropped
    assert ((out[0] > 0.5) != target["masks"][0].bool()).sum() <= 2  # a tie at an edge at most


@pytest.mark.parametrize("height, width", [(2, 31), (40, 48), (700, 5)])
def test_an_image_jittered_down_to_one_pixel_is_one_pixel_not_a_crash(height, width):
    # --jitter 0.03 0.03 at --img-size 32: every image comes out 1 x 1, where PyTorch's uint8 antialiased resize
    # failed an internal assert (num_channels == unpacked_output.size(0)) and the loader with it
    image = tv_tensors.Image(torch.full((3, height, width), 200, dtype=torch.uint8))
    masks = torch.ones(1, height, width, dtype=torch.uint8)
    target = {"boxes": tv_tensors.BoundingBoxes([[0, 0, width, height]], format="XYXY", canvas_size=(height, width)),
              "masks": tv_tensors.Mask(masks), "labels": torch.tensor([1])}
    out, target = train_transforms(32, (0.03, 0.03))(image, target)
    assert out.shape == (3, 1, 1) and torch.allclose(out, torch.full_like(out, 200 / 255))
    assert target["masks"].shape == (1, 1, 1) and target["boxes"].tolist() == [[0, 0, 1, 1]]
