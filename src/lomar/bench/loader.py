"""Input-pipeline benchmark: can the data loader keep the model fed?

:func:`make_test_set` (:mod:`lomar.bench.testset`, torch-free) writes realistic JPEGs from the bundled demo
photographs (camera size 4000×3000 or ImageNet size ~500×375, quality 90). :func:`measure_loader` times decode +
crop + masking plan from those files per loader worker, and the model's training step for the same configuration,
and says which of the two limits a run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from lomar.bench.timing import build_runner, interleaved_times, method_config
from lomar.data.collate import collate_pretrain
from lomar.data.device_decode import decode_dataset
from lomar.data.fast_decode import jpeg_size
from lomar.data.folder import build_pretrain_dataset
from lomar.errors import in_flags
from lomar.methods.base import method_runtime
from lomar.models.masking import WindowsDoNotFit, grid_size
from lomar.models.vit import model_config
from lomar.window_counts import paper_windows

__all__ = ["loader_dataset", "measure_loader", "time_loader", "cpu_ms_per_image",
           "share_model_rate"]

_MODEL_KEYS = ("model_images_per_s", "model_batch_size", "precision", "compile", "compile_mode", "device")


def loader_dataset(data: str | Path, img_size: int, method: str = "lomar", windows: int | None = 4,
                   patch_size: int = 16, decode: str = "full", window_size: int = 7):
    """The pretraining dataset of ``data`` as ``lomar pretrain --decode DECODE`` reads it, with the
    masking plan of ``method`` (LoMaR: ``windows`` K x K windows per image, 0 or None the whole image).

    ``decode``: "full" (the reference path of :mod:`lomar.data.folder`), "draft" (reduced-size
    JPEG decoding) or "windows" (draft + only the plan's windows resampled; a windowed method).
    """
    # The variant build_runner times (its MAE is the global one), with pretraining's window placement.
    variant, config = method_config(method, img_size, windows, window_size=window_size)
    try:  # else every sample's plan fails, as if the image were unreadable
        variant.validate(config, grid_size(img_size, patch_size))
    except ValueError as exc:  # in the loader bench's flags: its windows are 7x7, placed as pretraining places them
        message = str(exc)
        if isinstance(exc, WindowsDoNotFit):  # its fixes in the bench's terms: no window size or placement to pass
            fix = "use a larger size (--sizes) or a model of smaller patches" if exc.param == "window_size" else \
                f"pass num_windows <= {exc.most} or use a larger image"
            message = f"{exc.detail}; {fix}"
        raise ValueError(f"{img_size}px: {in_flags(message, {'num_windows': '--loader-windows'})}") from None
    base = build_pretrain_dataset(str(data), img_size, masker=method_runtime(config, patch_size).masker)
    return decode_dataset(base, decode, patch_size, window_size, windows).dataset


def camera_crops(data: str | Path, count: int, size: int) -> tuple[list[torch.Tensor], list[tuple], list[bool]]:
    """The first ``count`` JPEGs of ``data`` (sorted names) as ``--decode gpu`` hands them to the device:
    each file's bytes (uint8 (n,)), a crop box (top, left, h, w) and a flip, drawn by the pretraining
    transform at ``size`` px from a fixed seed. SystemExit naming the fix when there are none."""
    paths = sorted(p for p in Path(data).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:count]
    if not paths:
        raise SystemExit(f"no .jpg files in {data}; pass a folder of camera-size JPEGs")
    datas = [p.read_bytes() for p in paths]
    transform = loader_dataset(data, size, "lomar", 1).transform
    gen = torch.Generator().manual_seed(0)
    boxes = [transform.crop_box(*jpeg_size(d), gen) for d in datas]
    flips = [bool(torch.rand(1, generator=gen) < 0.5) for _ in datas]
    return [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], boxes, flips


def time_loader(dataset, workers: int, images: int, batch_size: int = 16, repeats: int = 1) -> tuple[float, int]:
    """(images/s of iterating ``images`` samples of ``dataset`` with ``workers`` loader workers, how many of
    them could not be read). Only the images that read count: a failed read is no load.

    One untimed pass starts the (persistent) workers and warms their imports; each timed pass
    then runs from asking for the first batch to the last, so nothing is prefetched before
    the clock starts. With several ``repeats`` the median rate is returned. ValueError when none reads.
    """
    count = min(images, len(dataset))
    # pretraining's collate: the batch is stacked in the worker, as training does
    loader = DataLoader(Subset(dataset, range(count)), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_pretrain, persistent_workers=workers > 0)
    unreadable = sum(len(batch["bad"]) for batch in loader)  # the warm-up pass
    if unreadable == count:
        raise ValueError(f"none of the {count} images timed could be read; check --data")
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        seen = sum(len(batch["paths"]) for batch in loader)
        rates.append(seen / max(time.perf_counter() - start, 1e-9))
    return statistics.median(rates), unreadable


def cpu_ms_per_image(dataset, images: int = 16) -> float:
    """CPU milliseconds per sample in this process, one thread: a worker's cost that other
    load on a shared machine barely changes (unlike images/s, which it divides)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        count = min(images, len(dataset))
        dataset[0]  # imports and first-call set-up
        start = time.process_time()
        for i in range(count):
            dataset[i]
        return 1000 * (time.process_time() - start) / count
    finally:
        torch.set_num_threads(threads)


def measure_loader(data: str | Path, sizes: list[int], workers: int = 1, method: str = "lomar",
                   windows: int | str | None = "paper", decode: str = "full", images: int = 64, batch_size: int = 16,
                   model: str = "vit_base_patch16", model_batch: int | None = None,
                   device: torch.device | str = "cpu", precision: str = "fp32", compile: bool = False,
                   steps: int = 3, warmup: int = 1, model_rate: bool = True, tiny: bool = False,
                   repeats: int = 1, progress=lambda msg: None, compile_mode: str = "default") -> list[dict]:
    """Loader and model rates per image size.

    Per size: images/s of decode + crop + masking plan with ``workers`` loader workers (the rate
    per worker is ``images_per_s``; ``loader_images_per_s`` is the total), the model's training
    step rate of the same configuration (``model_images_per_s``, from
    :func:`lomar.bench.timing.build_runner`), and ``limited_by``: "loader" when the loader's
    total rate is below the model's, else "model". ``workers`` = 0 loads in the main process
    and counts as one worker. ``cpu_ms_per_image``: the CPU time of one sample in this process
    (one thread), the figure to compare on a busy machine. ``windows``: LoMaR's windows per image, a
    count at every size or "paper", ``lomar pretrain --windows auto``'s count at each size (36 at 896 px
    with 16 px patches), so that ``--decode windows`` and the model step are timed as the run would have them.
    """
    patch = model_config(model).patch_size
    device = torch.device(device)
    records = []
    for size in sizes:
        count = paper_windows(size, patch, 7) if windows == "paper" else windows  # the bench's windows are 7x7
        dataset = loader_dataset(data, size, method, count, patch, decode)
        total, unreadable = time_loader(dataset, workers, images, batch_size, repeats)
        per_worker = total / max(workers, 1)
        cpu_ms = cpu_ms_per_image(dataset, min(images, 16))
        rec = dict(task="loader", method=method, img_size=size, windows=count if method == "lomar" else None,
                   decode=decode, workers=workers, images=min(images, len(dataset)), unreadable=unreadable,
                   data=str(data), images_per_s=per_worker, loader_images_per_s=total, cpu_ms_per_image=cpu_ms,
                   cpu_images_per_s=1000 / cpu_ms, model=model)
        skipped = f" ({unreadable} unreadable, not counted)" if unreadable else ""
        progress(f"{size}px {decode}: {per_worker:.1f} images/s per worker{skipped}, {cpu_ms:.1f} CPU ms per image")
        if model_rate:
            runner = build_runner(method, model, size, count, model_batch or batch_size, device, precision,
                                  compile, tiny=tiny, compile_mode=compile_mode)
            interleaved_times([runner], steps, warmup)
            if runner.error:  # the one configuration here: nothing to go on with
                raise RuntimeError(f"the model's step at {size}px failed at its {runner.error}"
                                   + (f"; where (it may be a bug):\n{runner.trace}" if runner.trace else ""))
            _limited_by(rec, dict(model_images_per_s=runner.batch_size / statistics.median(runner.times),
                                  model_batch_size=runner.batch_size, precision=precision, compile=compile,
                                  compile_mode=compile_mode, device=str(device)))
            del runner
        else:
            rec.update(model_images_per_s=None, limited_by=None)
        records.append(rec)
    return records


def _limited_by(rec: dict, model: dict) -> None:
    """Give a loader record the model's rate (``model``: the model_* keys) and the side that limits."""
    rec.update(model, limited_by="loader" if rec["loader_images_per_s"] < model["model_images_per_s"] else "model",
               workers_to_feed_model=model["model_images_per_s"] / max(rec["images_per_s"], 1e-9))


def share_model_rate(records: list[dict]) -> None:
    """Give records measured without the model (``model_rate=False``) the model rate of a record
    of the same size, and their limiting side: the model step does not depend on the decoding."""
    rates = {r["img_size"]: r for r in records if r.get("model_images_per_s") is not None}
    for r in records:
        if r.get("model_images_per_s") is None and r["img_size"] in rates:
            _limited_by(r, {k: rates[r["img_size"]][k] for k in _MODEL_KEYS})
