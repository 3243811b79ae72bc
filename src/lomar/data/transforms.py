"""Reproducible pretraining augmentation: the per-sample generator and the one sample draw.

Every random choice for a sample comes from a generator seeded by (run seed, epoch, sample
index), and :func:`draw_sample` is the only code that draws them, in one fixed order: crop
box, flip, masking plan (then the colour jitter's factors, only when it is on, so that a run
without jitter draws exactly what it drew before). Every decode path (full, draft, windows, gpu)
calls it, so a sample gets the same crop, flip and plan whichever path decodes it, whichever worker loads it,
however many processes share the batch, and after any resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from lomar.data.image_errors import reason

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Masker", "denormalize", "sample_key", "sample_seed", "sample_generator",
           "SampleDraw", "draw_sample", "PretrainTransform", "source_size", "make_item", "unreadable_item"]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN, _STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

Masker = Callable[[torch.Generator], dict[str, torch.Tensor]]


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (N, 3, H, W) -> pixels in [0, 1]."""
    return (images.float() * _STD.to(images.device) + _MEAN.to(images.device)).clamp(0, 1)


def sample_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """(index, epoch) of a map-style dataset key: ``(index, epoch)`` from the engine's sampler, or a
    bare index (epoch 0). Keys may arrive as numpy or tensor integers from custom samplers."""
    return (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed that is a pure function of (seed, epoch, index), below 2**63."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that is a pure function of (seed, epoch, index)."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


class SampleDraw(NamedTuple):
    """A sample's random choices: ``box`` (top, left, h, w) in full-size pixels of the (EXIF-oriented)
    image, ``flip`` (mirror the crop horizontally), ``plan`` (the masker's ``{name: tensor}``, or {}),
    ``jitter`` (the colour jitter's ((op, factor), ...) in the order applied, or () when off)."""

    box: tuple[int, int, int, int]
    flip: bool
    plan: dict[str, torch.Tensor]
    jitter: tuple[tuple[str, float], ...] = ()


def draw_sample(transform: PretrainTransform, masker: Masker | None, height: int, width: int,
                gen: torch.Generator) -> SampleDraw:
    """The random choices of a ``height`` x ``width`` image, drawn from its generator ``gen`` in the
    one order every decode path shares: crop box, flip (only when ``transform.flip``), masking plan,
    colour jitter (only when ``transform.color_jitter``)."""
    box = transform.crop_box(height, width, gen)
    flip = transform.flip and bool(torch.rand(1, generator=gen) < 0.5)
    plan = masker(gen) if masker is not None else {}
    return SampleDraw(box, flip, plan, transform.jitter_draw(gen))


JITTER_OPS = ("brightness", "contrast", "saturation")


class PretrainTransform:
    """RandomResizedCrop (bicubic, antialiased) + horizontal flip [+ colour jitter] + ImageNet normalisation.

    Crops in uint8 before resizing, so a large image is never copied at full size as floats.
    ``scale``: the crop's area range (the method's recipe: 0.2-1 LoMaR/MAE, 0.08-1 BEiT);
    ``color_jitter``: torchvision's ColorJitter(j, j, j) strength (BEiT's 0.4; 0 = off), applied to
    the resized crop (BEiT jitters the whole image before cropping: contrast's grey mean is the image's
    there, and each op's clipping to [0, 255] comes before the resize there, so the pixels can differ).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, color_jitter: float = 0.0):
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), ratio, flip
        self.color_jitter = float(color_jitter)

    def crop_box(self, height: int, width: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w), distributed as torchvision's RandomResizedCrop.get_params."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(3, generator=gen).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
                left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
                return top, left, h, w
        # Fallback: central crop at the nearest allowed aspect ratio.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def jitter_draw(self, gen: torch.Generator) -> tuple[tuple[str, float], ...]:
        """ColorJitter's random order and factors (each uniform in [max(0, 1 - j), 1 + j]); () when off."""
        if not self.color_jitter:
            return ()
        order = torch.randperm(len(JITTER_OPS), generator=gen).tolist()
        u = torch.rand(len(JITTER_OPS), generator=gen).tolist()
        j = self.color_jitter
        # Above 1, torchvision draws in [0, 1 + j]; clipping a draw in [1 - j, 1 + j] at 0 instead gave factor 0
        # (a black, grey or colourless image) to 1 draw in 6 at j = 1.5
        return tuple((JITTER_OPS[i], 1 - j + 2 * j * u[i] if j <= 1 else (1 + j) * u[i]) for i in order)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, h, w) -> float32, ImageNet-normalised, on the pixels' device."""
        return (pixels.float() / 255.0 - _MEAN.to(pixels.device)) / _STD.to(pixels.device)

    def apply(self, image: torch.Tensor, draw: SampleDraw) -> torch.Tensor:
        """uint8 (3, H, W) -> float32 (3, size, size): ``draw``'s crop, resized, flipped, normalised."""
        from torchvision.transforms.v2 import functional as TF

        crop = TF.resized_crop(image, *draw.box, [self.size, self.size],
                               interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        for op, factor in draw.jitter:
            crop = getattr(TF, f"adjust_{op}")(crop, factor)
        return self.normalize(crop.flip(-1) if draw.flip else crop)


def unreadable_item(path: str, size: int, why: str = "") -> dict:
    """The item of a file that cannot be read, and why (:func:`~lomar.data.image_errors.reason`: the item names the
    file); ``size`` shapes an all-bad batch (0, 3, S, S)."""
    return {"image": None, "path": path, "size": size, "why": why}


def source_size(height: int, width: int) -> torch.Tensor:
    """An item's ``"source"``: int64 (2,) (height, width) of the whole (EXIF-oriented) image its crop was drawn from,
    which every decode path puts in its items, so that a run can count the images smaller than its crop (upscaled)."""
    return torch.tensor((height, width), dtype=torch.int64)


def make_item(path: str, decode: Callable[[], torch.Tensor], transform: PretrainTransform,
              gen: torch.Generator, masker: Masker | None) -> dict:
    """One pretraining sample on the reference path (the whole image decoded, then cropped):
    ``{"image": (3, S, S), "path", "source": (2,) :func:`source_size`, **plan}``, or :func:`unreadable_item`."""
    try:
        image = decode()
    except (ValueError, RuntimeError, OSError) as exc:
        return unreadable_item(path, transform.size, reason(exc))
    # outside the try: a crop or mask that fails on a decoded image is a bug to raise, not a file to blame
    height, width = image.shape[-2:]
    draw = draw_sample(transform, masker, height, width, gen)
    return {"image": transform.apply(image, draw), "path": path, "source": source_size(height, width), **draw.plan}
