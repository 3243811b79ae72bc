"""The pretraining augmentation against the recipes (SPEC §4, BEIT_SPEC §4) and torchvision's own
RandomResizedCrop and ColorJitter, whose draws ``PretrainTransform`` re-implements on a per-sample generator."""

from __future__ import annotations

import torchvision.transforms as T

from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PretrainTransform, draw_sample, sample_generator


def test_defaults_are_the_recipes_crop_flip_and_normalisation():
    # RandomResizedCrop(size, scale (0.2, 1.0), ratio torchvision's (3/4, 4/3), bicubic), flip p 0.5, ImageNet mean/std
    transform = PretrainTransform(32)
    crop = T.RandomResizedCrop(32)
    assert transform.scale == (0.2, 1.0) and transform.ratio == crop.ratio and transform.color_jitter == 0
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    flips = [draw_sample(transform, None, 40, 50, sample_generator(0, 0, i)).flip for i in range(400)]
    assert 0.42 < sum(flips) / len(flips) < 0.58


def test_a_crop_no_draw_fits_falls_back_to_torchvisions_central_crop():
    # 10 x 1000 px: no box of 20-100 % of the area at aspect 3/4-4/3 fits, so every draw is the fallback, the
    # centred crop at the nearest allowed aspect (RandomResizedCrop.get_params' last lines, deterministic)
    import torch

    transform = PretrainTransform(32)
    for height, width in ((10, 1000), (1000, 10), (7, 301)):
        image = torch.zeros(1, height, width)
        want = T.RandomResizedCrop.get_params(image, list(transform.scale), list(transform.ratio))
        for i in range(3):
            assert transform.crop_box(height, width, sample_generator(0, 0, i)) == tuple(want), (height, width)


def test_jitter_factors_are_drawn_as_torchvision_draws_them():
    # ColorJitter(j): each factor uniform in [max(0, 1 - j), 1 + j]; above j = 1 it never piles up at 0
    for j in (0.4, 1.5):
        transform = PretrainTransform(32, color_jitter=j)
        low, high = T.ColorJitter(j, j, j).brightness
        factors = [f for i in range(300) for _, f in transform.jitter_draw(sample_generator(0, 0, i))]
        assert low <= min(factors) and max(factors) <= high
        assert sum(f < low + (high - low) / 4 for f in factors) / len(factors) < 0.32, j  # a quarter of the range
        assert not any(f == 0 for f in factors), j


def test_a_transform_that_fails_on_a_decoded_image_raises_and_blames_no_file():
    # counted as an unreadable image, such a bug hid among "skipped" files until 10 % of them stopped the run
    import pytest
    import torch

    from lomar.data.transforms import make_item

    class Failing(PretrainTransform):
        def apply(self, image, draw):
            raise RuntimeError("a bug in the crop")

    gen = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match="a bug in the crop"):
        make_item("a.png", lambda: torch.zeros(3, 40, 40, dtype=torch.uint8), Failing(32), gen, None)

    def unreadable():
        raise OSError("cannot identify image file")

    assert make_item("b.png", unreadable, PretrainTransform(32), gen, None)["image"] is None


def test_the_crop_is_resized_bicubically_as_pil_resizes_it():
    # SPEC §4: RandomResizedCrop(..., bicubic) as the original applies it to a PIL image; a bilinear resize of the
    # same box is many levels away on a random image, PIL's bicubic within a level (uint8 rounding)
    import numpy as np
    import torch
    from PIL import Image

    from lomar.data.transforms import SampleDraw

    transform = PretrainTransform(24)
    pixels = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    top, left, h, w = 3, 5, 30, 36
    ours = transform.apply(pixels, SampleDraw((top, left, h, w), False, {}))
    levels = (ours * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]) * 255
    crop = Image.fromarray(pixels.permute(1, 2, 0).numpy()).crop((left, top, left + w, top + h))

    def pil(resample) -> torch.Tensor:
        return torch.from_numpy(np.array(crop.resize((24, 24), resample))).permute(2, 0, 1).float()

    assert float((levels - pil(Image.Resampling.BICUBIC)).abs().max()) <= 1.01
    assert float((levels - pil(Image.Resampling.BILINEAR)).abs().max()) > 10
