"""``lomar finetune --decode draft``: the finetune recipe's training crops of JPEG photos decoded at reduced size.

timm's training transform starts with a random resized crop of the whole decoded photo, then shrinks the crop to
the image size: a 12 MP photo is decoded whole (about 230 ms) for a 224 px crop. Here the crop box is drawn with
timm's own parameter draw on the header's EXIF-oriented size, from the same random stream at the same point, so
every sample gets the box (and then the flip, RandAugment ops and erasing) of ``--decode full``; the JPEG is decoded
at the largest DCT scale (1/2-1/8) that keeps both sides of the box at least the image size, the box is resampled
from it with the crop's interpolation, and the rest of timm's transform runs unchanged. Pixels differ slightly (a
DCT-domain low-pass before the resize), a camera's MPO file (its photo a JPEG, a preview or gain map after it)
drafted as any JPEG. Anything else (PNG, CMYK, a box under twice the image size, a file Pillow cannot decode this
way) is the reference path's sample, bit for bit.
"""

from __future__ import annotations

import random

import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import Dataset
from torchvision.transforms import Compose
from torchvision.transforms.functional import InterpolationMode, pil_modes_mapping

from lomar.data.collate import LabelledItem
from lomar.data.decode import JPEG_FORMATS, decode_box_reduced, open_pil, oriented_size, read_image_bytes
from lomar.data.folder import LabelledImageFolder

__all__ = ["DraftCropFolder"]


class DraftCropFolder(Dataset):
    """The items of ``base`` (a :class:`LabelledImageFolder` whose transform is timm's training Compose, a
    :class:`~timm.data.transforms.RandomResizedCropAndInterpolation` first), a JPEG's crop decoded at reduced size.

    Items and unreadable files as ``base``'s. The box is drawn from python's global ``random`` stream as timm's
    crop draws it, so under :class:`lomar.data.classify.SeededSamples` a sample's augmentation is ``base``'s."""

    def __init__(self, base: LabelledImageFolder):
        first, *rest = getattr(base.transform, "transforms", (None,))
        if not isinstance(first, RandomResizedCropAndInterpolation):
            raise ValueError(f"draft decoding needs a transform that starts with timm's random resized crop, got "
                             f"{type(first).__name__}")
        self.base, self.crop, self.rest = base, first, Compose(rest)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple:
        base = self.base
        path = base.paths.text(index)
        drawn = random.getstate()
        try:
            data = read_image_bytes(path)
            with open_pil(data, path) as img:  # the header only: its size is checked against the pixel limit
                jpeg = img.format in JPEG_FORMATS and img.mode in ("RGB", "L")
                source = oriented_size(img) if jpeg else None  # before the crop's draft shrinks the image's size
                image = self._crop(img, path) if jpeg else None
        except (ValueError, OSError, RuntimeError, SyntaxError, Image.DecompressionBombError):
            image = None  # the reference path reads the file again, and skips and reports it if it fails there too
        if image is None:
            random.setstate(drawn)  # the reference path draws the same box from where this one started
            return base[index]
        return LabelledItem(self.rest(image), int(base.labels[index]), path, source)

    def _crop(self, img: Image.Image, path: str) -> Image.Image | None:
        """The crop of the opened photo ``img`` (read from the file ``path``) resized to the transform's size; None
        where a reduced decode gains nothing (the box is under twice the size on a side)."""
        height, width = oriented_size(img)  # the box's frame: a phone's portrait photo is stored sideways
        # timm's draw reads only the image's size: a stride-0 view has it without a pixel allocated
        top, left, h, w = self.crop.get_params(torch.empty(()).expand(height, width), self.crop.scale,
                                               self.crop.ratio)
        interpolation = self.crop.interpolation  # then the interpolation, as timm's __call__ draws it
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        out_h, out_w = self.crop.size
        if min(h, w) < 2 * max(out_h, out_w):
            return None
        reduced, fbox = decode_box_reduced(img, (top, left, h, w), max(out_h, out_w), path)
        resample = pil_modes_mapping[interpolation] if isinstance(interpolation, InterpolationMode) else interpolation
        return reduced.resize((out_w, out_h), resample, box=fbox)
