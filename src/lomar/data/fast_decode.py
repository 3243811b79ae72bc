"""Faster pretraining samples with the same distribution: reduced-size JPEG decoding,
window-only resampling, and batched GPU decoding.

The pretraining transform (random-resized crop, flip, normalisation) decodes the whole photo
and resizes the whole crop, although the crop is then shrunk to S px and a windowed method
only looks at a few K·p px windows of it. Here:

* **reduced-size decoding** (:func:`draft_decode_crop`): the crop box is drawn in full-size
  coordinates exactly as :meth:`PretrainTransform.crop_box` draws it, then the JPEG is decoded
  at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's ``draft``) as long as the crop
  stays at least ``S`` px on each side, and the box is mapped to the reduced image with
  sub-pixel precision. The crops' distribution is unchanged; the pixels differ slightly
  because the DCT-scaled image is a different low-pass than the antialiased bicubic resize
  (bounded in ``tests/bench/test_loader.py``).
* **window-only resampling** (:func:`resample_windows`): the output is (3, S, S) with only
  the pixels of the plan's windows filled in (zeros elsewhere, i.e. the ImageNet mean after
  normalisation); each window is resampled from its own source sub-box. LoMaR reads nothing
  else, so its loss depends only on the filled pixels.
* **GPU decoding** (:func:`gpu_decode_crops`): torchvision's batched CUDA JPEG decoder, with
  crop, resize and flip on the device.

Randomness is drawn from the per-sample generator in the same order as the reference path
(crop box, then flip, then masking plan), so every sample gets the same crop, flip and plan.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["draft_decode_crop", "resample_windows", "FastPretrainDataset", "gpu_decode_crops",
           "jpeg_size", "window_boxes"]

_JPEG_SCALES = (8, 4, 2, 1)


def _normalize(pixels: torch.Tensor, transform) -> torch.Tensor:
    """uint8 (..., 3, h, w) -> float32 normalised with the transform's mean/std, on the pixels' device."""
    device = pixels.device
    return (pixels.float() / 255.0 - transform.mean.to(device)) / transform.std.to(device)


def _pil_to_tensor(img) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def _open(source: str | Path | bytes):
    """The image opened by Pillow once the file and its header passed the checks every decode
    path shares (:func:`lomar.data.decode.open_pil`); ValueError naming the file otherwise."""
    from lomar.data.decode import open_pil, read_image_bytes

    if isinstance(source, bytes):
        return open_pil(source)
    return open_pil(read_image_bytes(source), str(source))


def _oriented(img) -> bool:
    """True when EXIF asks for a rotation/flip: the box would be drawn on the wrong axes."""
    try:
        return int(img.getexif().get(0x0112, 1)) not in (0, 1)
    except Exception:
        return True


def _reduce(img, box: tuple[int, int, int, int], size: int):
    """Decode ``img`` at the smallest JPEG scale keeping the crop >= ``size`` px on each side.

    Returns (decoded PIL image, box in its coordinates as floats (left, top, right, bottom)).
    """
    width, height = img.size
    top, left, h, w = box
    if img.format == "JPEG" and not _oriented(img):
        for scale in _JPEG_SCALES:
            if h / scale >= size and w / scale >= size:
                img.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
                break
    img = img.convert("RGB")  # decodes (at the draft scale, if one was set)
    if _oriented(img) and img.size == (width, height):
        from PIL import ImageOps

        img = ImageOps.exif_transpose(img)
        width, height = img.size
    sx, sy = img.size[0] / width, img.size[1] / height
    return img, (left * sx, top * sy, (left + w) * sx, (top + h) * sy)


def jpeg_size(source: str | Path | bytes) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only (no decoding)."""
    with _open(source) as img:
        width, height = img.size
        if _oriented(img) and int(img.getexif().get(0x0112, 1)) in (5, 6, 7, 8):
            width, height = height, width
    return height, width


def draft_decode_crop(source: str | Path | bytes, transform, gen: torch.Generator) -> tuple[torch.Tensor, bool]:
    """Random-resized crop of a photo with reduced-size decoding.

    ``transform``: the dataset's :class:`lomar.data.transforms.PretrainTransform` (its ``crop_box``,
    ``size``, ``flip``). Draws the box in full-size coordinates, then the flip, from ``gen``
    exactly as the transform does. Returns (uint8 (3, S, S) crop, already flipped; flipped).
    """
    from PIL import Image

    with _open(source) as img:
        height, width = jpeg_size(source) if _oriented(img) else (img.size[1], img.size[0])
        box = transform.crop_box(height, width, gen)
        flipped = bool(transform.flip and bool(torch.rand(1, generator=gen) < 0.5))
        reduced, fbox = _reduce(img, box, transform.size)
        out = reduced.resize((transform.size, transform.size), Image.Resampling.BICUBIC, box=fbox)
    pixels = _pil_to_tensor(out)
    return (pixels.flip(-1) if flipped else pixels), flipped


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


def resample_windows(source: str | Path | bytes, transform, gen: torch.Generator, masker,
                     patch_size: int, window_size: int) -> tuple[torch.Tensor, dict]:
    """Only the windows of the masking plan, resampled from a reduced-size decode.

    Draws box, flip and then the plan (``masker(gen)``, a dict with ``top_left`` (n, 2) in patch
    units) in the reference order. Returns (uint8 (3, S, S) with zeros outside the windows,
    the masker's dict).
    """
    from PIL import Image

    size, extent = transform.size, window_size * patch_size
    with _open(source) as img:
        height, width = jpeg_size(source) if _oriented(img) else (img.size[1], img.size[0])
        box = transform.crop_box(height, width, gen)
        flipped = bool(transform.flip and bool(torch.rand(1, generator=gen) < 0.5))
        plan = masker(gen)
        reduced, fbox = _reduce(img, box, size)
    out = torch.zeros(3, size, size, dtype=torch.uint8)
    for sub, r, c in window_boxes(fbox, size, plan["top_left"] * patch_size, extent, flipped):
        patch = _pil_to_tensor(reduced.resize((extent, extent), Image.Resampling.BICUBIC, box=sub))
        out[:, r:r + extent, c:c + extent] = patch.flip(-1) if flipped else patch
    return out, plan


class FastPretrainDataset(Dataset):
    """The pretraining dataset of an :class:`lomar.data.folder.ImageListDataset`, faster.

    ``mode``: "draft" (reduced-size decode, whole crop resized) or "windows" (reduced-size
    decode, only the plan's windows resampled; needs ``patch_size``/``window_size`` and a
    masker returning ``top_left``; ``num_windows`` per image decides whether resampling
    windows one by one beats one resize). A sample that gains nothing (a photo too small to
    decode reduced, windows covering most of the crop) takes the reference path, bit for bit.
    Items as the base dataset's: ``{"image", "path", **plan}``;
    unreadable files give ``image=None`` like the base.
    """

    def __init__(self, base, mode: str = "draft", patch_size: int | None = None, window_size: int | None = None,
                 num_windows: int | None = None):
        if mode not in ("draft", "windows"):
            raise ValueError(f"mode must be 'draft' or 'windows', got {mode!r}")
        if mode == "windows" and (patch_size is None or window_size is None or base.masker is None):
            raise ValueError("mode 'windows' needs patch_size, window_size and a windowed masker")
        self.base, self.mode, self.patch_size, self.window_size = base, mode, patch_size, window_size
        # Resampling windows one by one only pays when they cover well under the crop (e.g. 4
        # windows of 112 px fill a 224 px crop, but 6 % of an 896 px one) or the decode shrinks.
        size = base.transform.size
        self.sparse = mode == "windows" and (num_windows or 1) * (window_size * patch_size) ** 2 < size * size / 2

    def __len__(self) -> int:
        return len(self.base)

    def _reducible(self, path: str, gen: torch.Generator) -> bool:
        return (self.mode == "windows" and self.sparse) or _can_reduce(path, self.base.transform, gen)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        from lomar.data.transforms import sample_generator, sample_key

        index, epoch = sample_key(key)
        base = self.base
        path = str(base.paths[index % len(base.paths)])
        gen = sample_generator(base.seed, epoch, index)
        try:
            if not self._reducible(path, gen):
                # No DCT scale keeps the crop >= S px (small photos): the reference path is the
                # fastest there, and exact. The generator is rewound, so the draws are the same.
                from lomar.data.decode import load_image

                image = base.transform(load_image(path), gen)
                plan = base.masker(gen) if base.masker is not None else {}
                return {"image": image, "path": path, **plan}
            if self.mode == "windows":
                pixels, plan = resample_windows(path, base.transform, gen, base.masker, self.patch_size,
                                                self.window_size)
            else:
                pixels, _ = draft_decode_crop(path, base.transform, gen)
                plan = base.masker(gen) if base.masker is not None else {}
        except (ValueError, OSError, RuntimeError):
            return {"image": None, "path": path, "size": base.transform.size}
        return {"image": _normalize(pixels, base.transform), "path": path, **plan}


def _can_reduce(source, transform, gen: torch.Generator) -> bool:
    """Whether the crop ``gen`` will draw can be decoded at 1/2 scale or less; ``gen`` is left as it was."""
    with _open(source) as img:
        if img.format != "JPEG" or _oriented(img):
            return False
        width, height = img.size
    state = gen.get_state()
    _, _, h, w = transform.crop_box(height, width, gen)
    gen.set_state(state)
    return h / 2 >= transform.size and w / 2 >= transform.size


def gpu_decode_crops(datas: list[bytes | torch.Tensor], boxes: list[tuple[int, int, int, int]], size: int,
                     flips: list[bool], device: torch.device | str = "cuda") -> torch.Tensor:
    """Batched CUDA JPEG decode + crop + antialiased bicubic resize + flip, on the device.

    ``boxes``: (top, left, h, w) in full-size coordinates (draw them with the transform's
    ``crop_box`` on :func:`jpeg_size`). Returns uint8 (N, 3, S, S) on ``device``. On CUDA the
    batch goes through nvjpeg in one call; "cpu" runs the same code and gives the reference
    transform's pixels exactly (what the tests check). EXIF orientation is not applied.
    """
    import warnings

    encoded = [d if isinstance(d, torch.Tensor) else torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():  # torchvision 0.29's notice of its decoders' move to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as TF

        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)

    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device)
    for i, (image, (top, left, h, w), flip) in enumerate(zip(images, boxes, flips)):
        # The reference transform's own resize: on CPU the same pixels as --decode full.
        crop = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=TF.InterpolationMode.BICUBIC,
                               antialias=True)
        out[i] = crop.flip(-1) if flip else crop
    return out
