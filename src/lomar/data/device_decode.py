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
bit, and travels as pixels. A share of the photos (``--cpu-decode-share``, balanced by default:
:mod:`lomar.data.decode_share`) is decoded by the workers themselves, as ``--decode draft`` does,
so that the workers' cores add to the device's decoder.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from lomar.data import collate
from lomar.data.decode_share import DecodeShare
from lomar.data.fast_decode import FastPretrainDataset, draft_decode_crop, gpu_decode_crops
from lomar.data.folder import ImageListDataset
from lomar.errors import exception_line

__all__ = ["DEVICE_DECODE_TYPES", "Decoding", "decode_dataset", "EncodedPretrainDataset", "collate_encoded",
           "decode_batch", "DeviceDecode", "decoded_ahead"]


DEVICE_DECODE_TYPES = ("cuda",)  # devices with a batched JPEG decoder in torchvision
_SOURCE_PLACE = re.compile(r"^.*\.(?:cpp|cu|h):\d+,\s*")


class Decoding(NamedTuple):
    """How a run reads its pretraining data: ``dataset`` and ``collate`` for the DataLoader, and
    ``on_device``, a step applied to every batch on the training device (``batch -> batch`` holding
    ``"images"`` (B', 3, S, S)): None, except that ``--decode gpu`` decodes there, sharing the photos
    with the workers as ``share`` says."""

    dataset: Dataset
    collate: Callable[[list[dict]], dict]
    on_device: Callable[[dict], dict] | None = None
    share: DecodeShare | None = None

    def batches(self, loader: Iterable[dict], device: torch.device | str, ahead: int = 1) -> Iterator[dict]:
        """The batches of ``loader`` (over :attr:`dataset`) as the training loop takes them: with an
        ``on_device`` step, applied ``ahead`` batches ahead (:func:`decoded_ahead`; 0: just in time)."""
        if self.on_device is None:
            return iter(loader)
        if ahead == 0:
            return map(self.on_device, loader)
        return decoded_ahead(loader, self.on_device, device, ahead)


def decode_dataset(base, mode: str, patch_size: int, window_size: int, windows: int,
                   device: torch.device | str = "cuda", cpu_share: float | None = 0.0, workers: int = 0,
                   gpu_decoder: str = "torchvision") -> Decoding:
    """The :class:`Decoding` of ``base`` (a pretraining dataset) with ``--decode mode``: full (``base``
    itself), draft / windows (:class:`lomar.data.fast_decode.FastPretrainDataset`) or gpu
    (:class:`EncodedPretrainDataset`, finished by :class:`DeviceDecode` on ``device``; ``cpu_share``
    of the photos decoded by the ``workers`` loader workers, None: balanced; the device's JPEG decoder
    ``gpu_decoder``, :mod:`lomar.data.gpu_jpeg`). ValueError naming the
    fix when ``base`` is not read from image files or ``device`` has no batched decoder."""
    if mode == "full":  # collate_pretrain through its module at each call: the engine tests replace it there
        return Decoding(base, collate.collate_pretrain)
    if not isinstance(base, ImageListDataset):
        raise ValueError(f"--decode {mode} reads image files, not tar shards; use --decode full")
    if mode != "gpu":
        return Decoding(FastPretrainDataset(base, mode, patch_size, window_size, windows), collate.collate_pretrain)
    device = torch.device(device)
    if device.type not in DEVICE_DECODE_TYPES:
        raise ValueError(f"--decode gpu needs a CUDA device, but this run is on {device.type}; use --decode draft")
    share = DecodeShare(cpu_share, workers)
    on_device = DeviceDecode(device, base.transform, share, gpu_decoder)
    return Decoding(EncodedPretrainDataset(base, share), collate_encoded, on_device, share)


class EncodedPretrainDataset(FastPretrainDataset):
    """The pretraining dataset of an :class:`lomar.data.folder.ImageListDataset`, left encoded.

    Items: ``{"image": None, "encoded": uint8 (n,) file bytes, "box": int64 (4,) (top, left, h, w)
    in full-size pixels, "flip": bool, "path", "source", **plan}`` for a JPEG the device can decode, else the
    base dataset's item (``"image"`` decoded, ``"encoded"`` None); an unreadable file has both None.
    A JPEG that ``share`` gives the worker (one that decodes at 1/2 scale or less) is decoded as
    ``--decode draft`` does, but left uint8 for the device to normalise (a quarter of the bytes to
    hand over): ``"image"`` uint8 (3, S, S), ``"encoded"`` None. Items of JPEGs also hold
    ``"drafted"`` (whether the worker decoded it) and ``"worker_s"`` (the worker's seconds on it).
    """

    def __init__(self, base: ImageListDataset, share: DecodeShare | None = None):
        super().__init__(base, "gpu")
        self.share = DecodeShare(0.0) if share is None else share

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        start = time.perf_counter()
        item = super().__getitem__(key)
        item.setdefault("encoded", None)
        if "drafted" in item:  # a JPEG this class read (not the reference path's item)
            item["worker_s"] = time.perf_counter() - start
        return item

    def _decode(self, img, data: bytes, draw, name: str) -> dict:
        size = self.base.transform.size
        if min(draw.box[2:]) / 2 >= size and self.share.takes():
            return {"image": draft_decode_crop(img, size, draw, name), "encoded": None, "drafted": True}
        return {**super()._decode(img, data, draw, name), "drafted": False}


_LISTED = ("image", "encoded", "box", "flip", "drafted", "worker_s")
# Items of EncodedPretrainDataset -> a batch for decode_batch: {"encoded": [bytes tensor or None], "image":
# [(3, S, S) or None], "box": [(4,) or None], "flip", "drafted": [bool or None each], "worker_s": [float or
# None], "bad", "paths", **stacked plan fields}.
collate_encoded = partial(collate.collate_pretrain, listed=_LISTED)


def decode_batch(batch: dict, device: torch.device, transform, decoder: str = "torchvision") -> dict:
    """Decode a :func:`collate_encoded` batch on ``device`` with ``decoder`` (:mod:`lomar.data.gpu_jpeg`):
    the same batch with ``"images"`` (B', 3, S, S) float32 on ``device``, normalised as ``transform``
    (the dataset's :class:`lomar.data.transforms.PretrainTransform`) does.

    A file whose header parsed but whose data the decoder refuses joins ``"bad"``, with the decoder's
    reason under ``"why"``, and leaves the batch (the plan fields are cut to match), as an unreadable
    file does on the reference path.
    """
    # Rows drafted by the workers and rows decoded here are uint8 until one normalisation of them all:
    # a few launches a batch, not a few a photo (the step shares the device with this thread).
    images = [None if pixels is None else pixels.to(device, non_blocking=True) for pixels in batch["image"]]
    rows = [i for i, data in enumerate(batch["encoded"]) if data is not None]
    lists = ([batch[key][i] for i in rows] for key in ("encoded", "box", "flip"))
    refused: dict[str, str] = {}  # path -> why, as the reference path's items say it (the path names the file)
    for i, pixels in zip(rows, _decode_rows(*lists, transform.size, device, decoder)):
        if isinstance(pixels, str):
            refused[batch["paths"][i]] = pixels
        else:
            images[i] = pixels
    uint8_rows = [i for i, image in enumerate(images) if image is not None and image.dtype == torch.uint8]
    normalised = transform.normalize(torch.stack([images[i] for i in uint8_rows])) if uint8_rows else None
    for i, pixels in zip(uint8_rows, normalised.unbind(0) if uint8_rows else ()):
        images[i] = pixels
    keep = [image is not None for image in images]
    mask = torch.tensor(keep, dtype=torch.bool)
    out = {key: value[mask.to(value.device)] if isinstance(value, torch.Tensor) else value
           for key, value in batch.items() if key not in _LISTED}
    out["bad"] = batch["bad"] + [p for p, k in zip(batch["paths"], keep) if not k]
    out["why"] = {**batch["why"], **refused}
    out["paths"] = [p for p, k in zip(batch["paths"], keep) if k]
    kept = [image for image in images if image is not None]
    if len(uint8_rows) == len(kept) and kept:  # every row normalised in one batch, in order: no second copy
        out["images"] = normalised
    else:
        out["images"] = torch.stack(kept) if kept else torch.empty(0, 3, transform.size, transform.size,
                                                                   device=device)
    return out


class DeviceDecode:
    """``--decode gpu``'s step on the device: :func:`decode_batch`, timed for a balanced ``share``
    (:class:`lomar.data.decode_share.DecodeShare`): from the batch's arrival to its pixels being
    ready on the device (the current stream synchronised: a decode-ahead thread's own stream)."""

    def __init__(self, device: torch.device, transform, share: DecodeShare, decoder: str = "torchvision"):
        self.device, self.transform, self.share, self.decoder = torch.device(device), transform, share, decoder

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        out = decode_batch(batch, self.device, self.transform, self.decoder)
        seconds = None
        if self.share.auto:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            seconds = time.perf_counter() - start
        on_device = sum(data is not None for data in batch["encoded"])
        self.share.observe(batch["worker_s"], batch["drafted"], seconds, on_device)
        return out


def _decode_rows(datas: list[torch.Tensor], boxes: list[torch.Tensor], flips: list[bool], size: int,
                 device: torch.device, decoder: str) -> list[torch.Tensor | str]:
    """uint8 (3, S, S) per row, or why the decoder refused it; one bad file does not cost the batch."""
    boxes = [tuple(box.tolist()) for box in boxes]
    try:
        return list(gpu_decode_crops(datas, boxes, size, flips, device, decoder)) if datas else []
    except RuntimeError:
        pass
    out: list[torch.Tensor | str] = []
    for data, box, flip in zip(datas, boxes, flips):
        try:
            out.append(gpu_decode_crops([data], [box], size, [flip], device, decoder)[0])
        except RuntimeError as exc:
            # torchvision's first line leads with its source file and line ("decode_jpeg, .../decode_jpeg.cpp:171,
            # Image is incomplete or truncated"): the user needs the last part
            line = exception_line(exc)
            out.append(f"the {decoder} device JPEG decoder refused it ({_SOURCE_PLACE.sub('', line)}); replace or "
                       f"remove it")
    return out


_END = object()


def decoded_ahead(loader: Iterable[dict], on_device: Callable[[dict], dict], device: torch.device | str,
                  depth: int = 1) -> Iterator[dict]:
    """``on_device(batch)`` for every batch of ``loader``, computed by a background thread ``depth``
    batches ahead of the caller, on a CUDA stream of its own: the device decodes batch i + 1 while it
    trains on batch i, instead of after it. Same batches, same order; an error raised reading or
    decoding a batch is raised here, where that batch would have been.

    The caller's stream waits for each batch's decode (an event) and owns its memory from then on
    (``record_stream``). Leaving the loop early stops the thread before returning, so that the
    loader's next iterator (persistent workers) is never shared.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the caller's device: a new thread's would be cuda:0
        device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            with torch.cuda.device(device) if stream else contextlib.nullcontext(), \
                    torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                for batch in loader:
                    if stop.is_set():
                        return
                    batch = on_device(batch)
                    event = stream.record_event() if stream else None
                    if not hand_over((batch, event)):
                        return
            hand_over(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
            hand_over(exc)

    thread = threading.Thread(target=work, name="lomar-decode-ahead", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            batch, event = item
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for value in batch.values():
                    if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                        value.record_stream(current)
            yield batch
    finally:
        stop.set()
        thread.join()
