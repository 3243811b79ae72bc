"""What slows the training step while ``--decode gpu`` decodes beside it (issue 22, item 4).

In ``lomar pretrain --decode gpu`` at camera resolution the loop hardly waits for batches, yet its steps
run at 0.63x the model's rate: something the decoding does takes from the step. This runs the eager
LoMaR training step (the one ``lomar pretrain`` runs, on a fixed batch) alone, then beside each load
that decoding puts on the machine, one at a time, and records the step's rate and the load's photos/s:

- ``thread-decode``: a thread of this process decoding with nvjpeg on a stream of its own (no crops);
- ``thread-decode-crop``: the same thread doing what the decode-ahead thread does (decode, crop, resize);
- ``thread-decode-crop-switch``: the same with Python's thread switch interval at 0.5 ms, not 5 ms;
- ``thread-python``: a thread of pure Python (what holding the interpreter alone costs the step);
- ``process-decode-crop``: the decode and crops in another process (its own interpreter, same GPU);
- ``cpu-drafting``: ``--workers`` processes drafting photos as the loader workers do (CPU load only);
- ``thread-hw-decode``, ``thread-hw-decode-crop``: the thread's loads with ``--gpu-decoder nvimgcodec``
  (the GPU's hardware JPEG engines), where nvImageCodec is installed.

A load slowing the step in a thread but not in a process points at the interpreter's lock; slowing it
in both, at the GPU; ``cpu-drafting``, at the cores. ``--device cpu`` runs a tiny model and the CPU-side
loads only (what the CPU test exercises).

    python benchmarks/step_beside_decode.py --data DIR --json OUT.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lomar.bench.loader import camera_crops, loader_dataset
from lomar.bench.timing import build_runner, sync
from lomar.data.fast_decode import gpu_decode_crops
from lomar.data.gpu_jpeg import decode_jpegs, nvimgcodec_missing


def decode_loop(data: Path, count: int, size: int, crops: bool, device: str, decoder: str, done, stop,
                ready=None) -> None:
    """Decode ``count`` photos of ``data`` over and over on ``device`` with ``decoder`` (``--gpu-decoder``)
    until ``stop``, cropped and resized if ``crops``; ``done.value``: photos decoded."""
    datas, boxes, flips = camera_crops(data, count, size)
    stream = torch.cuda.Stream() if device == "cuda" else None
    with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
        if ready is not None:  # another process: one batch first, so its start-up is not timed
            gpu_decode_crops(datas, boxes, size, flips, device, decoder)
            sync(torch.device(device))
            ready.set()
        while not stop.is_set():
            if crops:
                out = gpu_decode_crops(datas, boxes, size, flips, device, decoder)
            else:
                out = decode_jpegs(datas, device, decoder)
            if stream is not None:
                stream.synchronize()
            del out  # after the synchronisation: nvImageCodec's images free outside torch's allocator
            with done.get_lock():
                done.value += len(datas)


def draft_loop(data: Path, size: int, windows: int, done, stop) -> None:
    """What a loader worker does with a share of 1: photos of ``data`` drafted, cropped and resized."""
    torch.set_num_threads(1)  # as DataLoader workers do: a forked child's inherited thread pool can hang
    dataset = loader_dataset(data, size, "lomar", windows, decode="draft")
    i = 0
    while not stop.is_set():
        dataset[i % len(dataset)]
        i += 1
        with done.get_lock():
            done.value += 1


def python_loop(done, stop) -> None:
    """Pure Python until ``stop``: what holding the interpreter costs the step's launches."""
    while not stop.is_set():
        sum(range(1000))
        done.value += 1


class Load:
    """One load running in the background between ``start`` and ``stop``; ``done.value`` counts its work."""

    def __init__(self, name: str, target, args: tuple, processes: int = 0, context: str = "fork"):
        self.name, self.target, self.args, self.processes, self.context = name, target, args, processes, context

    def start(self) -> None:
        ctx = mp.get_context(self.context)
        self.done, self.stop_event = ctx.Value("q", 0), ctx.Event()
        if self.processes:
            self.readies = [ctx.Event() for _ in range(self.processes)] if self.context == "spawn" else []
            extra = [(ready,) for ready in self.readies] or [()] * self.processes
            self.runners = [ctx.Process(target=self.target, args=(*self.args, self.done, self.stop_event, *e),
                                        daemon=True) for e in extra]
        else:
            self.readies = []
            self.runners = [threading.Thread(target=self.target, args=(*self.args, self.done, self.stop_event),
                                             daemon=True)]
        for runner in self.runners:
            runner.start()
        for ready in self.readies:
            if not ready.wait(120):
                raise RuntimeError(f"{self.name}: its process did not start in 120 s")

    def check(self) -> None:
        """RuntimeError if a runner ended before being told to: its count would read as a slow load."""
        if not all(runner.is_alive() for runner in self.runners):
            raise RuntimeError(f"{self.name}: a runner ended early (its traceback is above)")

    def stop(self) -> None:
        self.stop_event.set()
        for runner in self.runners:
            runner.join(60)


def step_rate(runner, seconds: float) -> tuple[float, int]:
    """Images per second of ``runner``'s steps over about ``seconds``, and the steps run."""
    sync(runner.device)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        runner.step()
        sync(runner.device)
        steps += 1
    return steps * runner.batch_size / (time.perf_counter() - start), steps


def runtime_calls(events: list[dict], step_ids: set[int], steps: int, top: int = 8) -> dict:
    """CUDA runtime and driver API calls of a profiler trace per host thread: for each thread (``step``
    where its id is one of ``step_ids``, else ``thread <id>``) its ``top`` calls by time, each with calls
    and ms per step and its longest call in ms, and ``total_ms`` per step.

    The step's launches taking longer beside a load than alone means the driver makes it wait (a lock
    another thread holds, an implicit synchronisation such as ``cudaFree``); its wall time growing with
    its launches as quick as alone means it waits outside CUDA, on the interpreter."""
    calls: dict[str, dict[str, list[float]]] = {}
    for event in events:
        if event.get("cat") not in ("cuda_runtime", "cuda_driver") or event.get("ph") != "X":
            continue
        tid = event.get("tid")
        label = "step" if tid in step_ids else f"thread {tid}"
        duration = event.get("dur", 0) / 1000
        count_ms_max = calls.setdefault(label, {}).setdefault(event.get("name", "?"), [0, 0.0, 0.0])
        count_ms_max[0] += 1
        count_ms_max[1] += duration
        count_ms_max[2] = max(count_ms_max[2], duration)
    summary = {}
    for label, names in sorted(calls.items()):
        ranked = sorted(names.items(), key=lambda item: -item[1][1])
        summary[label] = {"total_ms": round(sum(v[1] for v in names.values()) / steps, 2)}
        summary[label].update({name: {"calls": round(count / steps, 1), "ms": round(ms / steps, 3),
                                      "max_ms": round(longest, 3)} for name, (count, ms, longest) in ranked[:top]})
    return summary


def profiled(runner, steps: int = 4) -> dict:
    """``steps`` steps under torch.profiler (CUDA activity only, so the host side is not slowed): wall ms per
    step, kernel ms per step on each CUDA stream of this process, and each host thread's CUDA API calls
    (:func:`runtime_calls`). The step's stream busy as long as alone while the wall time grows means gaps
    (the host late with launches); its kernels taking longer means they share the GPU."""
    from torch.profiler import ProfilerActivity, profile

    sync(runner.device)
    activity = ProfilerActivity.CUDA if runner.device.type == "cuda" else ProfilerActivity.CPU  # CPU: no kernels
    with profile(activities=[activity]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            runner.step()
        sync(runner.device)
        wall = (time.perf_counter() - start) / steps
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    busy: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "kernel":
            stream = str(event.get("args", {}).get("stream"))
            busy[stream] = busy.get(stream, 0.0) + event.get("dur", 0) / 1000 / steps
    ident = threading.get_ident()  # the trace may name a thread by its kernel id or its pthread id
    step_ids = {threading.get_native_id(), ident, ident & 0xFFFFFFFF}
    return {"wall_ms": wall * 1000, "kernel_ms_by_stream": {k: round(v, 2) for k, v in sorted(busy.items())},
            "cuda_api_by_thread": runtime_calls(events, step_ids, steps)}


def profile_line(profile: dict) -> str:
    """One line of a :func:`profiled` record: wall, kernel ms per stream, each thread's three costliest
    CUDA calls (the JSON has more)."""
    threads = []
    for label, calls in profile["cuda_api_by_thread"].items():
        named = [f"{name} {c['calls']:g}x {c['ms']:.2f} ms" for name, c in calls.items() if name != "total_ms"][:3]
        threads.append(f"{label}: {calls['total_ms']:.1f} ms in CUDA calls ({', '.join(named)})")
    return "; ".join([f"wall {profile['wall_ms']:.1f} ms, kernels by stream {profile['kernel_ms_by_stream']}",
                      *threads])


def measure(args) -> list[dict]:
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    compiled = args.compile_mode != "eager"
    runner = build_runner("lomar", args.model, args.img_size, args.windows, args.batch, device,
                          "bf16" if cuda else "fp32", compile=compiled, tiny=not cuda,
                          compile_mode=args.compile_mode if compiled else "default")
    for _ in range(3):
        runner.step()
    common = (args.data, args.photos, args.img_size)
    loads = [Load("cpu-drafting", draft_loop, (args.data, args.img_size, args.windows), processes=args.workers),
             Load("thread-python", python_loop, ()),
             Load("thread-decode-crop", decode_loop, (*common, True, args.device, "torchvision"))]
    if cuda:
        loads += [Load("thread-decode", decode_loop, (*common, False, "cuda", "torchvision")),
                  Load("thread-decode-crop-switch", decode_loop, (*common, True, "cuda", "torchvision")),
                  Load("process-decode-crop", decode_loop, (*common, True, "cuda", "torchvision"), processes=1,
                       context="spawn")]
        if nvimgcodec_missing() is None:
            loads += [Load("thread-hw-decode", decode_loop, (*common, False, "cuda", "nvimgcodec")),
                      Load("thread-hw-decode-crop", decode_loop, (*common, True, "cuda", "nvimgcodec"))]
    if args.loads:
        unknown = set(args.loads) - {load.name for load in loads}
        if unknown:
            raise SystemExit(f"step_beside_decode: no load {', '.join(sorted(unknown))} here; the loads: "
                             f"{', '.join(load.name for load in loads)}")
        loads = [load for load in loads if load.name in args.loads]
    alone, steps = step_rate(runner, args.seconds)
    records = [dict(load="none", step_images_per_s=alone, steps=steps)]
    if args.profile:
        records[0]["profile"] = profiled(runner)
    print(f"{'none':26s} step {alone:7.1f} img/s", flush=True)
    if args.profile:
        print(f"{'':26s} profile {profile_line(records[0]['profile'])}", flush=True)
    for load in loads:
        switch = sys.getswitchinterval()
        if load.name.endswith("-switch"):
            sys.setswitchinterval(0.0005)
        record = dict(load=load.name)
        try:
            load.start()
            time.sleep(1.0)
            load.check()
            before, start = load.done.value, time.perf_counter()
            record["step_images_per_s"], record["steps"] = step_rate(runner, args.seconds)
            record["load_per_s"] = (load.done.value - before) / (time.perf_counter() - start)
            record["step_rate_kept"] = record["step_images_per_s"] / alone
            if args.profile:
                record["profile"] = profiled(runner)
            time.sleep(1.0)  # the load runs on alone: its own rate, once the step's last work has drained
            before, start = load.done.value, time.perf_counter()
            time.sleep(args.seconds / 2)
            load.check()
            record["load_alone_per_s"] = (load.done.value - before) / (time.perf_counter() - start)
        except Exception as exc:  # a load that cannot run: its reason is the result
            record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            load.stop()
            sys.setswitchinterval(switch)
        records.append(record)
        figures = record.get("error") or (
            f"step {record['step_images_per_s']:7.1f} img/s ({record['step_rate_kept']:.0%} kept), load "
            f"{record['load_per_s']:8.1f}/s beside, {record['load_alone_per_s']:8.1f}/s alone")
        print(f"{load.name:26s} {figures}", flush=True)
        if "profile" in record:
            print(f"{'':26s} profile {profile_line(record['profile'])}", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of JPEGs (camera-size)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--model", default="vit_base_patch16")
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--windows", type=int, default=9)
    parser.add_argument("--batch", type=int, default=64, help="images a training step")
    parser.add_argument("--compile-mode", default="eager", choices=("eager", "default", "reduce-overhead"),
                        help="the step eager (as lomar pretrain runs it by default) or compiled in this mode; "
                        "reduce-overhead replays it as CUDA graphs, a launch or so per step")
    parser.add_argument("--photos", type=int, default=32, help="photos a decode call")
    parser.add_argument("--workers", type=int, default=14, help="drafting processes of the cpu-drafting load")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per load")
    parser.add_argument("--profile", action="store_true", help="also profile a few steps alone and beside "
                        "each load: wall and kernel ms per step on each CUDA stream, CUDA API calls per thread")
    parser.add_argument("--loads", nargs="+", help="only these loads (default: all that can run here)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"--data {args.data}: no such folder; pass a folder of camera-size JPEGs")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; --device cpu runs a tiny model and the CPU loads")
    records = measure(args)
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "device": args.device, "batch": args.batch,
                                         "compile_mode": args.compile_mode,
                                         "img_size": args.img_size, "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
