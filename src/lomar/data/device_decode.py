"""``lomar pretrain --decode gpu``: JPEGs decoded in batches on the training device, and the
choice of the loader's reading for every ``--decode`` mode (:func:`decode_dataset`).

At high resolution a loader worker spends most of its time decoding photographs (see
``benchmarks/loader.md``). Here the workers only read the file, parse its header and draw the
sample's randomness; the main process decodes the whole batch on the GPU (torchvision's batched
nvjpeg decoder), then crops, resizes and flips there (:func:`lomar.data.fast_decode.gpu_decode_crops`).

The draws are those of every decode path (:func:`lomar.data.transforms.draw_sample` on the
full-size header), so every sample gets the same crop, flip and plan as with ``--decode full``;
only the decoder and the resize kernel's arithmetic differ. What the device decoder cannot take
(not a JPEG, CMYK, an EXIF rotation) is decoded by the worker on the reference path, bit for
bit, and travels as pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from lomar.data import collate
from lomar.data.fast_decode import FastPretrainDataset, gpu_decode_crops
from lomar.data.folder import ImageListDataset

__all__ = ["DEVICE_DECODE_TYPES", "Decoding", "decode_dataset", "EncodedPretrainDataset", "collate_encoded",
           "decode_batch"]

log = logging.getLogger("lomar.data")

DEVICE_DECODE_TYPES = ("cuda",)  # devices with a batched JPEG decoder in torchvision


class Decoding(NamedTuple):
    """How a run reads its pretraining data: ``dataset`` and ``collate`` for the DataLoader, and
    ``on_device``, the step the training loop applies to every batch it receives (``batch -> batch``
    holding ``"images"`` (B', 3, S, S)): the identity, except that ``--decode gpu`` decodes there."""

    dataset: Dataset
    collate: Callable[[list[dict]], dict]
    on_device: Callable[[dict], dict]


def decode_dataset(base, mode: str, patch_size: int, window_size: int, windows: int,
                   device: torch.device | str = "cuda") -> Decoding:
    """The :class:`Decoding` of ``base`` (a pretraining dataset) with ``--decode mode``: full (``base``
    itself), draft / windows (:class:`lomar.data.fast_decode.FastPretrainDataset`) or gpu
    (:class:`EncodedPretrainDataset`, finished by :func:`decode_batch` on ``device``). ValueError
    naming the fix when ``base`` is not read from image files or ``device`` has no batched decoder."""
    if mode == "full":  # collate_pretrain through its module at each call: the engine tests replace it there
        return Decoding(base, collate.collate_pretrain, _unchanged)
    if not isinstance(base, ImageListDataset):
        raise ValueError(f"--decode {mode} reads image files, not tar shards; use --decode full")
    if mode != "gpu":
        return Decoding(FastPretrainDataset(base, mode, patch_size, window_size, windows),
                        collate.collate_pretrain, _unchanged)
    device = torch.device(device)
    if device.type not in DEVICE_DECODE_TYPES:
        raise ValueError(f"--decode gpu needs a CUDA device, but this run is on {device.type}; use --decode draft")
    return Decoding(EncodedPretrainDataset(base), collate_encoded,
                    lambda batch: decode_batch(batch, device, base.transform))


def _unchanged(batch: dict) -> dict:
    return batch


class EncodedPretrainDataset(FastPretrainDataset):
    """The pretraining dataset of an :class:`lomar.data.folder.ImageListDataset`, left encoded.

    Items: ``{"image": None, "encoded": uint8 (n,) file bytes, "box": int64 (4,) (top, left, h, w)
    in full-size pixels, "flip": bool, "path", **plan}`` for a JPEG the device can decode, else the
    base dataset's item (``"image"`` decoded, ``"encoded"`` None); an unreadable file has both None.
    """

    def __init__(self, base: ImageListDataset):
        super().__init__(base, "gpu")

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        item = super().__getitem__(key)
        item.setdefault("encoded", None)
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
    keep = torch.ones(len(encoded), dtype=torch.bool)
    if rows:
        pixels, failed = _decode_rows([encoded[i] for i in rows], [tuple(batch["boxes"][i].tolist()) for i in rows],
                                      size, [batch["flips"][i] for i in rows], device)
        images[rows] = transform.normalize(pixels)
        keep[[rows[j] for j in failed]] = False
    for i, pixels in enumerate(batch["decoded"]):
        if pixels is not None:
            images[i] = pixels.to(device, non_blocking=True)
    out = {key: value for key, value in batch.items() if key not in ("encoded", "decoded", "boxes", "flips")}
    out["images"] = images
    if not keep.all():
        out["bad"] = batch["bad"] + [p for p, k in zip(batch["paths"], keep.tolist()) if not k]
        out["paths"] = [p for p, k in zip(batch["paths"], keep.tolist()) if k]
        out.update({key: value[keep.to(value.device)] for key, value in out.items() if isinstance(value, torch.Tensor)})
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
