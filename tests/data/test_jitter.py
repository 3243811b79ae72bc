"""ViTDet's large-scale jitter on inputs at the edge of what COCO files hold."""

import random

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lomar.data.jitter import _boxes_from_masks, crop_of_resized_masks, train_transforms


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


def _reference(masks, size, top, left, height, width):
    resized = TF.resize_image(masks, list(size), interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return TF.crop(resized, top, left, height, width)


def test_the_crop_of_resized_masks_is_bit_for_bit_the_crop_of_the_resize():
    # sources and sizes where torch's float32 rounding of (i + 0.5) * in / out lands on a tie (2 -> 3571 reads row 1
    # at 1785, which floor((i + 0.5) * float32(in / out)) puts at row 0: that formula fails here), then random ones:
    # up and down, odd, 1 px, 0 to 90 masks
    cases = [((n, 2, 5), (3571, 7)) for n in (1, 2)] + [((n, 5, 152), (9, 3572)) for n in (1, 3)]
    cases += [((1, 1, 7), (5, 3)), ((3, 6, 1), (2, 9)), ((2, 1, 1), (4, 4)), ((2, 9, 9), (1, 1))]
    rng = random.Random(0)
    for _ in range(100):
        count = rng.choice([0, 1, 1, 2, 5, 90])
        side = 30 if count == 90 else 120
        height, width = rng.randint(1, side), rng.randint(1, side)
        cases.append(((count, height, width), (rng.randint(1, 3 * side), rng.randint(1, 3 * side))))
    generator = torch.Generator().manual_seed(0)
    for shape, size in cases:
        masks = (torch.rand(shape, generator=generator) < 0.5).to(torch.uint8)
        height, width = rng.randint(1, size[0]), rng.randint(1, size[1])
        top, left = rng.randint(0, size[0] - height), rng.randint(0, size[1] - width)
        if max(size) > 3000:  # the ties: the whole frame
            top, left, height, width = 0, 0, *size
        for flip in (False, True):  # the jitter's flip, folded into the columns gathered
            expected = _reference(TF.horizontal_flip(masks) if flip else masks, size, top, left, height, width)
            got = crop_of_resized_masks(masks, size, top, left, height, width, flip=flip)
            assert got.shape == expected.shape and torch.equal(got, expected), (shape, size, top, left, width, flip)


class _Made(TorchDispatchMode):
    """The bytes of each storage an operation inside makes (views of its inputs are not made)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        self.sizes += [made.untyped_storage().nbytes() for made in pytree.tree_leaves(out)
                       if isinstance(made, torch.Tensor) and made.untyped_storage().data_ptr() not in given]
        return out


def test_the_jitter_makes_the_masks_once_at_the_crop():
    # each mask was resized whole before the crop (90 objects of a 640 x 480 image at 2x and 1024 px: 90 x 1536 x
    # 2048 bytes, 270 MiB, for a 90 MiB crop; here 16 x 102 x 128 for 16 x 64 x 64), then copied 4 times for the
    # boxes (two bool copies, an index of the filled masks, torchvision's SanitizeBoundingBoxes' index)
    count, height, width = 16, 40, 50
    masks = torch.zeros(count, height, width, dtype=torch.uint8)
    masks[:, 5:35, 10:45] = 1
    image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes([[10, 5, 45, 35]] * count, format="XYXY", canvas_size=(height, width)),
              "masks": tv_tensors.Mask(masks), "labels": torch.ones(count, dtype=torch.int64)}
    torch.manual_seed(0)
    assert torch.rand(1) < 0.5  # seed 0 flips the sample
    torch.manual_seed(0)
    with _Made() as made:
        out, target = train_transforms(64, (2.0, 2.0))(image, target)
    cropped = target["masks"].numel()
    assert target["masks"].shape == (count, 64, 64) and len(target["boxes"]) == count
    assert max(made.sizes) == cropped and made.sizes.count(cropped) == 1, sorted(made.sizes)[-5:]
    assert masks.numel() not in made.sizes  # the flip copied every mask whole before the jitter


class _ReferenceJitter(v2.ScaleJitter):
    """The jitter composed of torchvision's own ops: after RandomHorizontalFlip, ScaleJitter's scale then a crop
    drawn as lomar's, every input resized whole (masks by NEAREST_EXACT) and then cropped."""

    def __init__(self, size, scale_range):
        super().__init__((size, size), scale_range=scale_range, antialias=True)
        self.size = size

    def make_params(self, flat_inputs):
        height, width = (max(1, side) for side in v2.ScaleJitter.make_params(self, flat_inputs)["size"])
        h, w = min(height, self.size), min(width, self.size)
        top, left = int(torch.randint(height - h + 1, ())), int(torch.randint(width - w + 1, ()))
        return {"size": (height, width), "window": (top, left, h, w)}

    def transform(self, inpt, params):
        mode = v2.InterpolationMode.NEAREST_EXACT if isinstance(inpt, tv_tensors.Mask) else self.interpolation
        resized = self._call_kernel(TF.resize, inpt, size=list(params["size"]), interpolation=mode, antialias=True)
        return self._call_kernel(TF.crop, resized, *params["window"])


def _reference_pipeline(size, scale_range):
    return v2.Compose([v2.RandomHorizontalFlip(), _ReferenceJitter(size, scale_range), _boxes_from_masks,
                       v2.ToImage(), v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)])


def test_the_jitter_is_bit_for_bit_torchvisions_flip_resize_and_crop():
    # the flip is folded into the columns the crop gathers (no full-size copy of the masks): images, boxes, masks,
    # labels and the random stream after each sample as flipping every mask whole, then resizing and cropping it
    rng = random.Random(1)
    flipped = 0
    for case in range(150):
        height, width = rng.choice([1, 2, 3, 7, 31, 60]), rng.choice([1, 2, 5, 33, 64])
        count = rng.choice([0, 1, 3, 12])
        generator = torch.Generator().manual_seed(case)
        image = tv_tensors.Image(torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8))
        masks = (torch.rand(count, height, width, generator=generator) < rng.choice([0.02, 0.5])).to(torch.uint8)
        masks[:count // 3] = 0  # empty instances
        boxes = torch.tensor([[0, 0, width, height]] * count, dtype=torch.float32).view(count, 4)
        labels = torch.arange(count)
        size = rng.choice([32, 48, 64])
        low = rng.choice([0.1, 0.3, 1.0])
        scale_range = (low, rng.choice([low, 1.7, 2.0]))
        outputs = []
        for pipeline in (_reference_pipeline(size, scale_range), train_transforms(size, scale_range)):
            target = {"boxes": tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=(height, width)),
                      "masks": tv_tensors.Mask(masks.clone()), "labels": labels.clone(), "image_id": case}
            torch.manual_seed(case)
            outputs.append((*pipeline(image.clone(), target), torch.get_rng_state()))
        torch.manual_seed(case)
        flipped += bool(torch.rand(1) < 0.5)
        (image_ref, target_ref, state_ref), (image_got, target_got, state_got) = outputs
        assert torch.equal(image_got, image_ref) and torch.equal(state_got, state_ref), case
        assert target_got.keys() == target_ref.keys() and target_got["image_id"] == case
        for key in ("boxes", "masks", "labels"):
            got, ref = target_got[key], target_ref[key]
            assert type(got) is type(ref) and got.dtype == ref.dtype and torch.equal(got, ref), (case, key)
        assert target_got["boxes"].canvas_size == target_ref["boxes"].canvas_size == tuple(image_got.shape[-2:])
    assert 50 < flipped < 100
