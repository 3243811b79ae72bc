"""The classification transforms of the finetune recipe (SPEC §3), from timm's pieces."""

from __future__ import annotations

import math
import random
from functools import partial

import numpy as np
import torch

from lomar.data.decode import load_image_reduced
from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD, sample_key, sample_seed

__all__ = ["classification_transforms", "classification_eval_transform", "draft_eval_load", "eval_crop_ratio",
           "eval_resize", "IMAGENET_CROP", "bound_aspect", "MAX_ASPECT", "SeededSamples"]

MAX_ASPECT = 16  # long side / short side up to which an evaluation transform resizes an image whole


def bound_aspect(image):
    """``image`` (PIL or tensor) with its long side centre-cropped to at most :data:`MAX_ASPECT` times its short one.

    An evaluation resizes the short side to about the crop size and keeps the centre: resized whole,
    a 100,000 x 1 strip (a PNG of a few hundred bytes, far under the pixel limit) would first become
    gigabytes of pixels at 224 px. The centre crop lies well inside the central 16:1 part, so only
    such strips change, by under a pixel of the resize's rounding.
    """
    from torchvision.transforms.v2 import functional as TF  # torchvision imports torch._dynamo: only for an image

    height, width = TF.get_size(image)
    longest = MAX_ASPECT * min(height, width)
    if max(height, width) <= longest:
        return image
    return TF.center_crop(image, [min(height, longest), min(width, longest)])


def _posterize_any_bits(img, bits_to_keep, **_):
    """timm's posterize, also for ``bits_to_keep <= 0`` (every bit dropped: a black image).

    RandAugment's ``PosterizeIncreasing`` asks for 0 bits whenever the noisy magnitude
    (``mstd0.5``) reaches 10; Pillow 13 refuses ``ImageOps.posterize(img, 0)`` where older
    Pillow returned the black image the recipe was tuned with.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _augment_ops(transform) -> list:
    """timm's ``AugmentOp``s of a composed transform: RandAugment's and AugMix's ``ops``, and AutoAugment's (``--aa
    original``, ``v0``, ``3a``...) sub-policies, its ``policy`` (a list of lists of ops)."""
    from timm.data.auto_augment import AugmentOp

    found = []
    for t in getattr(transform, "transforms", ()):
        for op in [*getattr(t, "ops", ()), *(op for sub in getattr(t, "policy", ()) for op in sub)]:
            if isinstance(op, AugmentOp):
                found.append(op)
    return found


# ImageNet evaluation's centre crop (224 of a 256 px resize), as MAE's linear probe and DeiT/BEiT/MAE's finetuning
# evaluate at 224 px; an encoder export's crop_pct at 224 px and below (through eval_crop_ratio)
IMAGENET_CROP = 0.875


def eval_crop_ratio(img_size: int) -> float:
    """Centre-crop ratio of every evaluation transform (finetune's, k-NN's and the linear probe's, an export's
    crop_pct): 0.875 up to 224 px, 1.0 above, as DeiT/BEiT/MAE's finetuning evaluates."""
    return IMAGENET_CROP if img_size <= 224 else 1.0


def eval_resize(img_size: int) -> int:
    """The short side an image is resized to before its centre crop of ``img_size``: floored, as timm's eval
    transform (finetune's) computes it from the crop ratio."""
    return math.floor(img_size / eval_crop_ratio(img_size))


def classification_transforms(img_size: int, aa: str = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                              crop_scale: tuple[float, float] = (0.08, 1.0)):
    """(train, eval) transforms of the finetune recipe: timm's random resized crop (area range
    ``crop_scale``) + flip, RandAugment + random erasing, bicubic resize; evaluation centre-crops
    0.875 of the resized image at <= 224 px and the whole image (crop ratio 1.0) above, as the
    original does; strips are cut to :data:`MAX_ASPECT` first (:func:`bound_aspect`). The train
    transform's posterize ops are the guarded ones above, so every RandAugment, AutoAugment and AugMix
    policy works with every Pillow we allow (AutoAugment's ``v0`` asks for 0 bits in one sub-policy)."""
    from timm.data import create_transform

    train_tf = create_transform(img_size, is_training=True, scale=tuple(crop_scale), color_jitter=None,
                                auto_augment=None if aa == "none" else aa, interpolation="bicubic",
                                re_prob=reprob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for op in _augment_ops(train_tf):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize_any_bits
    return train_tf, classification_eval_transform(img_size)


def classification_eval_transform(img_size: int):
    """The finetune recipe's evaluation transform (PIL image -> float (3, img_size, img_size), ImageNet-normalised):
    timm's bicubic short-side resize and centre crop of :func:`eval_crop_ratio`, strips cut to :data:`MAX_ASPECT`
    first (:func:`bound_aspect`); what ``lomar finetune`` scores its validation split with and ``lomar predict`` runs
    a classifier on."""
    from timm.data import create_transform

    val_tf = create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=eval_crop_ratio(img_size),
                              mean=IMAGENET_MEAN, std=IMAGENET_STD)
    val_tf.transforms.insert(0, bound_aspect)  # its Resize is of the short side: strips first
    return val_tf


def draft_eval_load(val_tf):
    """The image reader of an evaluation under ``--decode draft``: a JPEG at the DCT scale that keeps its short side at
    least ``val_tf``'s resize (its centre crop is then the full decode's); None where it resizes no short side (the
    whole photo is read)."""
    from torchvision.transforms import Resize  # torchvision imports torch._dynamo: only for an evaluation

    resize = next((t.size for t in val_tf.transforms if isinstance(t, Resize)), None)
    if resize is None:  # no short-side resize to keep: the whole photo
        return None
    return partial(load_image_reduced, min_side=resize if isinstance(resize, int) else min(resize))


class SeededSamples:
    """A map-style dataset whose item ``(index, epoch)`` (the engine's sampler keys) is ``dataset[index]`` with
    python's, numpy's and torch's CPU random streams seeded by (seed, epoch, index) while it is made, and the
    caller's streams put back after. timm's transforms draw from those global streams: in loader workers,
    seeded once per worker, a resumed run's workers would start their streams over, and the rest of the
    interrupted epoch would get other crops and RandAugment ops than an uninterrupted run's."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = sample_key(key)
        seed = sample_seed(self.seed, epoch, index)
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
