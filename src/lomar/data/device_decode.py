"""``lomar pretrain --decode gpu``: JPEGs decoded in batches on the training device.

At high resolution a loader worker spends most of its time decoding photographs (see
``benchmarks/loader.md``). Here the workers only read the file, parse its header and draw the
sample's randomness; the main process decodes the whole batch on the GPU (torchvision's batched
nvjpeg decoder), then crops, resizes and flips there (:func:`lomar.data.fast_decode.gpu_decode_crops`).

The draws are those of the reference path, in its order (crop box from the full-size header,
then flip, then the masking plan, from the sample's own generator), so every sample gets the
same crop, flip and plan as with ``--decode full``; only the decoder and the resize kernel's
arithmetic differ. What the device decoder cannot take (not a JPEG, CMYK, an EXIF rotation)
is decoded by the worker on the reference path, bit for bit, and travels as pixels.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from lomar.data.decode import _check_pixels, max_image_pixels, read_image_bytes
from lomar.data.fast_decode import _normalize, _open, _oriented, gpu_decode_crops
from lomar.data.transforms import make_item, sample_generator, sample_key

__all__ = ["DEVICE_DECODE_TYPES", "EncodedPretrainDataset", "collate_encoded", "decode_batch", "decode_dataset"]

log = logging.getLogger("lomar.data")

DEVICE_DECODE_TYPES = ("cuda",)  # devices with a batched JPEG decoder in torchvision


def decode_dataset(base, mode: str, patch_size: int, window_size: int, windows: int):
    """(dataset, collate function) reading ``base`` (an ImageListDataset) with ``--decode mode``:
    full (``base`` itself), draft / windows (:class:`lomar.data.fast_decode.FastPretrainDataset`)
    or gpu (:class:`EncodedPretrainDataset`, to be finished by :func:`decode_batch`)."""
    from lomar.data.collate import collate_pretrain
    from lomar.data.fast_decode import FastPretrainDataset

    if mode == "full":
        return base, collate_pretrain
    if not hasattr(base, "paths"):
        raise ValueError(f"--decode {mode} reads image files, not tar shards; use --decode full")
    if mode == "gpu":
        return EncodedPretrainDataset(base), collate_encoded
    return FastPretrainDataset(base, mode, patch_size=patch_size, window_size=window_size,
                               num_windows=windows), collate_pretrain


class EncodedPretrainDataset(Dataset):
    """The pretraining dataset of an :class:`lomar.data.folder.ImageListDataset`, left encoded.

    Items: ``{"encoded": uint8 (n,) file bytes, "box": int64 (4,) (top, left, h, w) in full-size
    pixels, "flip": bool, "image": None, "path", **plan}`` for a JPEG the device can decode, else
    the base dataset's item (``"image"`` decoded, ``"encoded"`` None); an unreadable file has both None.
    """

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = sample_key(key)
        base = self.base
        path = str(base.paths[index % len(base.paths)])
        gen = sample_generator(base.seed, epoch, index)
        transform = base.transform
        try:
            data = read_image_bytes(path)  # not Path.read_bytes: a FIFO would block the worker
            with _open(data) as img:
                width, height = img.size
                on_device = img.format == "JPEG" and img.mode in ("RGB", "L") and not _oriented(img)
            _check_pixels(path, width, height, max_image_pixels())
        except (ValueError, OSError, SyntaxError) as exc:
            log.debug("skipping %s: %s", path, exc)
            return {"image": None, "encoded": None, "path": path, "size": transform.size}
        if not on_device:
            item = make_item(path, lambda: base._load(index % len(base.paths)), transform, gen, base.masker)
            return {**item, "encoded": None}
        box = transform.crop_box(height, width, gen)
        flip = bool(transform.flip and bool(torch.rand(1, generator=gen) < 0.5))
        item = {"image": None, "encoded": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                "box": torch.tensor(box), "flip": flip, "path": path}
        if base.masker is not None:
            item.update(base.masker(gen))
        return item


def collate_encoded(batch: list[dict]) -> dict:
    """Items of :class:`EncodedPretrainDataset` -> a batch for :func:`decode_batch`.

    -> {"encoded": [bytes tensor or None], "decoded": [(3, S, S) or None], "boxes": [(4,) or None],
    "flips": [bool], "bad": [paths], "paths": [paths], **stacked plan fields}.
    """
    good = [item for item in batch if item["image"] is not None or item["encoded"] is not None]
    out: dict = {"bad": [item["path"] for item in batch if item["image"] is None and item["encoded"] is None],
                 "paths": [item["path"] for item in good],
                 "encoded": [item["encoded"] for item in good], "decoded": [item["image"] for item in good],
                 "boxes": [item.get("box") for item in good], "flips": [item.get("flip", False) for item in good]}
    if good:
        for key in good[0]:
            if key not in ("path", "size", "image", "encoded", "box", "flip"):
                out[key] = torch.stack([item[key] for item in good])
    return out


def decode_batch(batch: dict, device: torch.device, transform) -> dict:
    """Decode a :func:`collate_encoded` batch on ``device``: the same batch with ``"images"``
    (B', 3, S, S) float32 on ``device``, normalised as ``transform`` (the dataset's
    :class:`lomar.data.transforms.PretrainTransform`) does.

    A file whose header parsed but whose data the decoder refuses joins ``"bad"`` and leaves the
    batch (the plan fields are cut to match), as an unreadable file does on the reference path.
    """
    encoded, size = batch["encoded"], transform.size
    rows = [i for i, e in enumerate(encoded) if e is not None]
    images = torch.empty(len(encoded), 3, size, size, device=device)
    keep = [True] * len(encoded)
    if rows:
        pixels, failed = _decode_rows([encoded[i] for i in rows], [tuple(batch["boxes"][i].tolist()) for i in rows],
                                      size, [batch["flips"][i] for i in rows], device)
        images[rows] = _normalize(pixels, transform)
        for j in failed:
            keep[rows[j]] = False
    for i, pixels in enumerate(batch["decoded"]):
        if pixels is not None:
            images[i] = pixels.to(device, non_blocking=True)
    out = {key: value for key, value in batch.items() if key not in ("encoded", "decoded", "boxes", "flips")}
    if all(keep):
        out["images"] = images
        return out
    index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)
    out["bad"] = batch["bad"] + [p for p, k in zip(batch["paths"], keep) if not k]
    out["paths"] = [p for p, k in zip(batch["paths"], keep) if k]
    out["images"] = images[index.to(device)]
    for key, value in out.items():
        if key not in ("images", "bad", "paths") and isinstance(value, torch.Tensor):
            out[key] = value[index]
    return out


def _decode_rows(datas: list[torch.Tensor], boxes, size: int, flips: list[bool],
                 device: torch.device) -> tuple[torch.Tensor, set[int]]:
    """uint8 (n, 3, S, S) and the rows that failed; one bad file does not cost the batch."""
    try:
        return gpu_decode_crops(datas, boxes, size, flips, device), set()
    except RuntimeError:
        pass
    out = torch.zeros(len(datas), 3, size, size, dtype=torch.uint8, device=device)
    failed = set()
    for j, (data, box, flip) in enumerate(zip(datas, boxes, flips)):
        try:
            out[j] = gpu_decode_crops([data], [box], size, [flip], device)[0]
        except RuntimeError as exc:
            log.debug("device decoder refused image %d of the batch: %s", j, exc)
            failed.add(j)
    return out, failed
