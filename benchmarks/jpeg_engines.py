"""Camera-size JPEG decoding on a GPU: torchvision's nvjpeg (what ``--decode gpu`` uses) against
nvImageCodec's backends, its hardware JPEG engines (``hw``) among them. Each decoder runs alone,
then beside a loop of bf16 GEMMs that stands in for training. Issue 22's item 4 asks whether the
engines add decoding that does not take the streaming multiprocessors from the step.

    python benchmarks/jpeg_engines.py --data DIR --json OUT.json      # on a CUDA device

nvImageCodec is optional (``nvidia-nvimgcodec-cu13`` and ``nvidia-nvjpeg`` wheels, see
``benchmarks/README.md``). A decoder that cannot start is reported with the reason, not measured.
With ``--device cpu`` only torchvision's CPU decoder runs, which is what the CPU test exercises.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from functools import partial
from pathlib import Path

import torch

from lomar.data.gpu_jpeg import decode_jpegs

NVIMGCODEC_BACKENDS = {"hw": "HW_GPU_ONLY", "gpu": "GPU_ONLY", "hybrid": "HYBRID_CPU_GPU"}


def nvimgcodec_decoder(kind: str, device: str):
    """nvImageCodec restricted to one backend kind; raises with the reason when it cannot start."""
    if device != "cuda":
        raise RuntimeError("needs CUDA")
    from nvidia import nvimgcodec

    decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind))])

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        images = decoder.decode([nvimgcodec.CodeStream(data.numpy().tobytes()) for data in datas])
        if any(image is None for image in images):
            raise RuntimeError(f"{kind} decoded {sum(i is not None for i in images)} of {len(images)} photos")
        return [torch.as_tensor(image, device="cuda") for image in images]
    return decode


class GemmLoad:
    """bf16 GEMMs on their own stream and thread while in a ``with`` block, as a training step keeps the
    SMs busy; ``count`` is how many ran."""

    def __init__(self, n: int = 8192):
        self.a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        self.stream, self.count, self.stop = torch.cuda.Stream(), 0, threading.Event()

    def _loop(self) -> None:
        with torch.cuda.stream(self.stream):
            while not self.stop.is_set():
                self.a @ self.a
                self.count += 1
                if self.count % 8 == 0:  # keep the queue short, so that stopping is prompt
                    self.stream.synchronize()

    def rate(self, seconds: float) -> float:
        """GEMMs per second with nothing beside them."""
        with self:
            time.sleep(seconds)
        return self.count / seconds

    def __enter__(self):
        self.stop.clear()
        self.count = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.stream.synchronize()


def timed(decode, batches: list[list[torch.Tensor]], device: str) -> float:
    """Photos per second over ``batches``, after one warm-up batch."""
    decode(batches[0])
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        decode(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return sum(map(len, batches)) / (time.perf_counter() - start)


def measure(data: Path, device: str, count: int, batch: int, repeats: int) -> list[dict]:
    paths = sorted(p for p in data.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:count]
    if not paths:
        raise SystemExit(f"jpeg_engines: no .jpg files in {data}; pass --data with camera-size JPEGs")
    datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    batches = [datas[i:i + batch] for i in range(0, len(datas), batch)] * repeats
    decoders = {"torchvision": lambda: partial(decode_jpegs, device=device),
                **{f"nvimgcodec-{name}": partial(nvimgcodec_decoder, kind, device)
                   for name, kind in NVIMGCODEC_BACKENDS.items()}}
    load = GemmLoad() if device == "cuda" else None
    gemm_alone = load.rate(2.0) if load else None
    records = []
    for name, make in decoders.items():
        record = {"decoder": name, "photos": len(datas), "batch": batch, "device": device}
        try:
            decode = make()
            record["alone_images_per_s"] = timed(decode, batches, device)
            if load:
                with load:
                    start = time.perf_counter()
                    record["beside_gemm_images_per_s"] = timed(decode, batches, device)
                    seconds = time.perf_counter() - start
                record["gemm_rate_kept"] = load.count / seconds / gemm_alone
        except Exception as exc:  # a decoder that cannot start or decode: its reason is the result
            record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of JPEGs (camera-size)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--count", type=int, default=128, help="photos read from --data")
    parser.add_argument("--batch", type=int, default=32, help="photos a decode call")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the photos")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"--data {args.data}: no such folder; pass a folder of camera-size JPEGs")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; --device cpu times torchvision's CPU decoder")
    records = measure(args.data, args.device, args.count, args.batch, args.repeats)
    for r in records:
        figures = (f"{r['alone_images_per_s']:7.1f} img/s alone" if "alone_images_per_s" in r else r["error"])
        if "beside_gemm_images_per_s" in r:
            figures += (f", {r['beside_gemm_images_per_s']:7.1f} beside the GEMMs, which kept "
                        f"{r['gemm_rate_kept']:.0%} of their rate")
        print(f"{r['decoder']:18s} {figures}")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
