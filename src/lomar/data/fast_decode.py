"""Faster pretraining samples with the same draws: reduced-size JPEG decoding, window-only
resampling, and the worker's side of batched GPU decoding.

The pretraining transform (random-resized crop, flip, normalisation) decodes the whole photo
and resizes the whole crop, although the crop is then shrunk to S px and a windowed method
only looks at a few K·p px windows of it. Here:

* **reduced-size decoding** (:func:`draft_decode_crop`): the crop box is drawn in full-size
  coordinates, then the JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
  Pillow's ``draft``) as long as the crop stays at least ``S`` px on each side, and the box is
  mapped to the reduced image with sub-pixel precision. The crops' distribution is unchanged;
  the pixels differ slightly because the DCT-scaled image is a different low-pass than the
  antialiased bicubic resize (bounded in ``tests/bench/test_loader.py``).
* **window-only resampling** (:func:`resample_windows`): the output is (3, S, S) with only
  the pixels of the plan's windows filled in (zeros elsewhere: black, about -2 after
  normalisation); each window is resampled from its own source sub-box of the same reduced
  decode as the draft path's crop (its pixels there up to a level or two of rounding: the
  sub-box's filter weights are computed apart). LoMaR and MAE with windows read nothing else, so
  their loss depends only on the filled pixels; BEiT's too where its k-means tokenizer's patch is
  the model's (a dVAE, or a view resized from other patches, reads around each patch).
* **GPU decoding** (:func:`gpu_decode_crops`): torchvision's batched CUDA JPEG decoder, with
  crop, resize and flip on the device (the batch side is :mod:`lomar.data.device_decode`).

:class:`FastPretrainDataset` reads each file's header, checks its size against the pixel limit
and draws the sample's crop box, flip and plan with :func:`lomar.data.transforms.draw_sample`
on the header's (EXIF-oriented) size: every sample gets the reference path's crop, flip and plan.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from lomar.data.decode import (
    JPEG_FORMATS,
    WIDE_MODES,
    decode_box_reduced,
    exif_orientation,
    open_pil,
    oriented_size,
    pil_to_tensor,
    read_image_bytes,
)
from lomar.data.folder import ImageListDataset
from lomar.data.gpu_jpeg import decode_jpegs, frees_outside_torch
from lomar.data.image_errors import reason
from lomar.data.transforms import SampleDraw, draw_sample, source_size, unreadable_item

__all__ = ["FAST_MODES", "FastPretrainDataset", "draft_decode_crop", "resample_windows", "window_boxes",
           "gpu_decode_crops", "jpeg_size"]

FAST_MODES = ("draft", "windows", "gpu")


def jpeg_size(source: str | Path | bytes) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only (no decoding), once the file and
    its header passed the checks every decode path shares (:func:`lomar.data.decode.open_pil`)."""
    data, name = (source, "<bytes>") if isinstance(source, bytes) else (read_image_bytes(source), str(source))
    with open_pil(data, name) as img:
        return oriented_size(img)


def draft_decode_crop(img: Image.Image, size: int, draw: SampleDraw, name: str) -> torch.Tensor:
    """``draw``'s crop of the opened photo ``img`` (header read, not decoded), decoded at reduced size:
    uint8 (3, size, size), already flipped if ``draw.flip``; ValueError naming ``name``, its file, for one cut short."""
    reduced, fbox = decode_box_reduced(img, draw.box, size, name)
    pixels = pil_to_tensor(reduced.resize((size, size), Image.Resampling.BICUBIC, box=fbox))
    return pixels.flip(-1) if draw.flip else pixels


def window_boxes(fbox: tuple[float, float, float, float], size: int, top_left: torch.Tensor,
                 extent: int, flipped: bool) -> list[tuple[tuple[float, float, float, float], int, int]]:
    """Source sub-boxes of the output windows.

    ``fbox``: the crop in source coordinates (left, top, right, bottom); ``top_left`` (n, 2): the
    windows' top-left pixel (row, col) in the *flipped* S×S output; ``extent``: window side in
    output px. Returns [(source box, out row, out col)], the box being that of the unflipped image.
    """
    left, top, right, bottom = fbox
    sx, sy = (right - left) / size, (bottom - top) / size
    boxes = []
    for r, c in top_left.tolist():
        c_unflipped = size - c - extent if flipped else c
        boxes.append(((left + c_unflipped * sx, top + r * sy, left + (c_unflipped + extent) * sx,
                       top + (r + extent) * sy), r, c))
    return boxes


def resample_windows(img: Image.Image, size: int, draw: SampleDraw, patch_size: int, window_size: int,
                     name: str) -> torch.Tensor:
    """Only the windows of ``draw.plan`` (``top_left`` (n, 2) in patch units) of ``draw``'s crop of the
    opened photo ``img``, resampled from a reduced-size decode: uint8 (3, size, size), zeros outside them; ValueError
    naming ``name``, its file, for one cut short."""
    extent = window_size * patch_size
    reduced, fbox = decode_box_reduced(img, draw.box, size, name)
    out = torch.zeros(3, size, size, dtype=torch.uint8)
    for sub, r, c in window_boxes(fbox, size, draw.plan["top_left"] * patch_size, extent, draw.flip):
        patch = pil_to_tensor(reduced.resize((extent, extent), Image.Resampling.BICUBIC, box=sub))
        out[:, r:r + extent, c:c + extent] = patch.flip(-1) if draw.flip else patch
    return out


class FastPretrainDataset(Dataset):
    """The samples of an :class:`lomar.data.folder.ImageListDataset`, decoded faster with the same draws.

    ``mode``: "draft" (reduced-size decode, whole crop resized), "windows" (reduced-size decode,
    only the plan's windows resampled; needs ``patch_size``/``window_size`` and a masker whose plan
    has ``top_left``; ``num_windows`` per image decides whether resampling windows one by one
    beats one resize) or "gpu" (the file left encoded: see
    :class:`lomar.data.device_decode.EncodedPretrainDataset`). A sample that gains nothing (a photo
    too small to decode reduced, windows covering most of the crop, not a plain JPEG) is the base
    dataset's item, bit for bit. Items as the base dataset's: ``{"image", "path", "source", **plan}``; an
    unreadable file, or one over the pixel limit, gives ``image=None`` like the base.
    """

    def __init__(self, base: ImageListDataset, mode: str = "draft", patch_size: int | None = None,
                 window_size: int | None = None, num_windows: int | None = None):
        if mode not in FAST_MODES:
            raise ValueError(f"mode must be one of {', '.join(FAST_MODES)}, got {mode!r}")
        plan = base.masker(torch.Generator()) if base.masker is not None else {}  # a throwaway draw: its fields
        if mode == "windows" and (patch_size is None or window_size is None or "top_left" not in plan):
            raise ValueError("--decode windows needs a windowed method (a masking plan of windows); "
                             "use --decode draft")
        if mode == "windows":  # the plan's windows: --windows 0 draws one of the whole grid, whatever K is set
            window_size, num_windows = math.isqrt(plan["mask"].shape[-1]), len(plan["top_left"])
        self.base, self.mode, self.patch_size, self.window_size = base, mode, patch_size, window_size
        # Resampling windows one by one only pays when they cover well under the crop (e.g. 4
        # windows of 112 px fill a 224 px crop, but 6 % of an 896 px one) or the decode shrinks.
        size = base.transform.size
        self.sparse = mode == "windows" and (num_windows or 1) * (window_size * patch_size) ** 2 < size * size / 2

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        base = self.base
        _, path, gen = base.sample(key)
        try:
            data = read_image_bytes(path)  # regular files only, bounded: a FIFO would block the worker
            with open_pil(data, str(path)) as img:  # checks the size before anything is decoded
                if not self._takes(img):
                    return base[key]
                source = oriented_size(img)
                draw = draw_sample(base.transform, base.masker, *source, gen)
                item = self._decode(img, data, draw, str(path))
        except (ValueError, OSError, RuntimeError, SyntaxError, Image.DecompressionBombError) as exc:
            return unreadable_item(path, base.transform.size, reason(exc))
        # None: no DCT scale keeps the crop >= S px (small photos), where the reference path is the
        # fastest, and exact; it draws the same box, flip and plan from a fresh generator.
        return base[key] if item is None else {**item, "path": path, "source": source_size(*source), **draw.plan}

    def _takes(self, img: Image.Image) -> bool:
        """Whether this mode decodes ``img`` itself (else the reference path does)."""
        if img.mode in (*WIDE_MODES, "F"):  # only the reference path scales them to 8 bits (or refuses floats)
            return False
        if self.mode == "gpu":  # the device ignores EXIF
            return self.sparse or (img.format == "JPEG" and exif_orientation(img) in (0, 1)
                                   and img.mode in ("RGB", "L"))
        return self.sparse or img.format in JPEG_FORMATS

    def _decode(self, img: Image.Image, data: bytes, draw: SampleDraw, name: str) -> dict | None:
        """The item's image fields by this mode (``name``: the file ``data`` was read from); None when the reference
        path is as fast."""
        size = self.base.transform.size
        if self.mode == "gpu":
            return {"image": None, "encoded": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                    "box": torch.tensor(draw.box), "flip": draw.flip}
        if not self.sparse and min(draw.box[2:]) / 2 < size:
            return None
        pixels = (resample_windows(img, size, draw, self.patch_size, self.window_size, name) if self.mode == "windows"
                  else draft_decode_crop(img, size, draw, name))
        return {"image": self.base.transform.normalize(pixels)}


def gpu_decode_crops(datas: list[bytes | torch.Tensor], boxes: list[tuple[int, int, int, int]], size: int,
                     flips: list[bool], device: torch.device | str = "cuda", decoder: str = "torchvision"
                     ) -> torch.Tensor:
    """Batched CUDA JPEG decode + crop + antialiased bicubic resize + flip, on the device.

    ``boxes``: (top, left, h, w) in full-size coordinates (draw them with the transform's
    ``crop_box`` on :func:`jpeg_size`). Returns uint8 (N, 3, S, S) on ``device``. On CUDA the
    batch goes through ``decoder`` (:mod:`lomar.data.gpu_jpeg`) in one call; "cpu" runs the same code
    with torchvision's decoder and gives the reference transform's pixels exactly (what the tests
    check). EXIF orientation is not applied.
    """
    from torchvision.transforms.v2 import functional as TF

    encoded = [d if isinstance(d, torch.Tensor) else torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    images = decode_jpegs(encoded, device, decoder)
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device)
    for i, (image, (top, left, h, w), flip) in enumerate(zip(images, boxes, flips)):
        # The reference transform's own resize: on CPU the same pixels as --decode full.
        crop = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=TF.InterpolationMode.BICUBIC,
                               antialias=True)
        out[i] = crop.flip(-1) if flip else crop
    if frees_outside_torch(decoder):  # the crops must be done before the decoder's buffers go
        torch.cuda.current_stream(torch.device(device)).synchronize()
    return out
