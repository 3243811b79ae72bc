"""``--decode gpu``'s worker share on CPU, with the device's JPEG decoder emulated: does ``auto``
find the balance, through real loader workers and the decode-ahead thread, and what does it gain?

The pipeline is ``lomar pretrain``'s: :func:`lomar.data.device_decode.decode_dataset` over
camera-size JPEGs (4000x3000), a DataLoader with ``--workers`` processes that read, parse and draw
(and draft-decode their share for real), :class:`~lomar.data.device_decode.DeviceDecode` on a
decode-ahead thread, and a training loop. Only the device is emulated: its decoder costs
``--device-ms`` per photo and the training step ``--step-ms`` per photo, both as sleeps (no CPU
used, as a GPU would not). Each share setting runs in turn; the figures are images/s of the
loop and the share where each run ended. Writes ``--json``.

    python benchmarks/decode_share.py --json benchmarks/decode-share-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from unittest import mock

import torch
from torch.utils.data import DataLoader

from lomar.bench.testset import make_test_set
from lomar.data import device_decode
from lomar.data.folder import build_pretrain_dataset
from lomar.methods import get_method


class _LoMaR:  # the masker's settings at 224 px: 4 windows of 7x7 patches
    window_size, windows, mask_ratio, window_placement = 7, 4, 0.8, "permutation"


def emulated_decode(device_s: float):
    """decode_batch with the device emulated: ``device_s`` seconds per encoded photo, asleep."""
    def decode(batch, device, transform, decoder="torchvision"):
        time.sleep(device_s * sum(data is not None for data in batch["encoded"]))
        return {"images": torch.zeros(len(batch["paths"]), 3, transform.size, transform.size)}
    return decode


def run(files: str, share: float | None, workers: int, batches: int, batch_size: int, device_s: float,
        step_s: float) -> dict:
    base = build_pretrain_dataset(files, 224, masker=get_method("lomar").masker(_LoMaR(), (14, 14)))
    with mock.patch.object(device_decode, "DEVICE_DECODE_TYPES", ("cpu",)), \
            mock.patch.object(device_decode, "decode_batch", emulated_decode(device_s)):
        decoding = device_decode.decode_dataset(base, "gpu", 16, 7, 4, "cpu", share, workers)
        # one long epoch over the files again and again (a sample's key wraps around the file list)
        order = torch.randperm(batches * batch_size, generator=torch.Generator().manual_seed(0)).tolist()
        loader = DataLoader(decoding.dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                            collate_fn=decoding.collate)
        shares, start, first = [], time.perf_counter(), 0
        with contextlib.closing(decoding.batches(loader, "cpu", ahead=1)) as stream:
            for done, batch in enumerate(stream, 1):
                time.sleep(step_s * len(batch["images"]))  # the training step
                shares.append(round(decoding.share.value, 3))
                if done == batches // 4:  # the first quarter (workers starting, auto probing) is not timed
                    start, first = time.perf_counter(), done
    rate = (done - first) * batch_size / (time.perf_counter() - start)
    return dict(share="auto" if share is None else share, images_per_s=round(rate, 1),
                share_last=decoding.share.value, workers_decoded=decoding.share.decoded_share,
                share_by_batch=shares[::max(1, len(shares) // 20)],
                means_ms={k: round(1000 * v, 2) for k, v in decoding.share.means.items()})


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device-ms", type=float, default=25.0, help="emulated device decode, ms per photo")
    parser.add_argument("--step-ms", type=float, default=2.0, help="emulated training step, ms per photo")
    parser.add_argument("--shares", default="0 auto 0.5 1", help="the --cpu-decode-share settings to run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_test_set(tmp, "camera", 64)
        records = []
        for text in args.shares.split():
            rec = run(tmp, None if text == "auto" else float(text), args.workers, args.batches, args.batch_size,
                      args.device_ms / 1000, args.step_ms / 1000)
            print(f"--cpu-decode-share {text}: {rec['images_per_s']} img/s, share at the end {rec['share_last']:.2f}, "
                  f"workers decoded {rec['workers_decoded']:.0%}; per photo (ms) {rec['means_ms']}", flush=True)
            records.append(rec)
    result = dict(settings=vars(args), cpu=_cpu_name(), cores=os.cpu_count(),
                  torch=torch.__version__, device_limit_images_per_s=1000 / args.device_ms, records=records)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
