"""``lomar bench --task backbone``'s parent process: which variants run, their memory estimates and skips, one child
process per variant (:mod:`lomar.bench.backbone` runs it), the records and their table.

Imports no torch (~5 s a process, with what lomar's models pull in): the children time the steps, each importing it
for itself, and the parent's own import of it bought nothing but the start-up. A CUDA device's free memory is the
exception: torch reads it (a CUDA run's parent has imported torch already, resolving ``--device``).

One record per (image size, attention variant): seconds per forward + backward of the encoder
(no head, no optimizer) on a random batch, and the peak memory of that step. Variants:
``dense``, ``chunked``, ``flex`` (CUDA), ``auto`` (the encoder's own choice) and ``windowed``
(ViTDet blocks: 14×14 windows except blocks 2, 5, 8, 11 of 12, scaled to the depth; ``auto``
attention in the global blocks). ``encoders`` adds a second axis: ``lomar`` (iRPE, the default),
``mae`` (absolute table, no relative term) and ``mae+decomposed`` / ``mae+bias`` (the terms ``detect`` and
``segment`` add to an MAE encoder, :mod:`lomar.models.relpos`), so their cost is measured side by side.

Each variant runs in a child process, so that its memory high-water mark is its own and a
variant that dies (out of memory) becomes a record saying so instead of ending the bench. On CPU
the child's glibc returns freed blocks of 64 KiB and more to the OS, so that its peak resident set
measures the step's live memory rather than heap fragmentation (``_MMAP_THRESHOLD``).
Before running, the step's memory is estimated; a variant whose estimate exceeds the memory
available gets a ``skipped`` record with the reason.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys

from lomar.bench import stats
from lomar.models.attention_sizes import CHUNK_BIAS_BYTES, DENSE_BIAS_BYTES, DENSE_MAX_TOKENS
from lomar.models.vit_config import model_config

__all__ = ["ENCODERS", "ELEMENT_BYTES", "WINDOW", "arch", "estimate_bytes", "model_flops", "available_bytes",
           "bench_backbone", "format_table"]

# encoder name -> (pos, rel_pos) of its ViTConfig
ENCODERS = {"lomar": ("rpe", "none"), "mae": ("abs", "none"), "mae+decomposed": ("abs", "decomposed"),
            "mae+bias": ("abs", "bias")}
# --precision -> bytes per element of the step's activations (lomar.bench.timing.DTYPES' itemsize)
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# glibc serves blocks above this size by mmap and returns them on free. Its default threshold
# rises to 32 MiB after the first large free, and the many 1-32 MiB temporaries of chunked
# attention then fragment the heap: at 2048 px the resident set reached 13 GB for ~4 GB live.
_MMAP_THRESHOLD = 64 * 1024
WINDOW = 14  # ViTDet's windows, in patches; a global block ends each quarter of the depth


def arch(model: str, tiny: bool, depth: int | None = None) -> tuple[int, int, int, int]:
    """(patch size, width, depth, heads) of the encoder timed: ``model``'s, or the tiny one the tests use."""
    c = model_config(model)
    if tiny:
        return c.patch_size, 32, depth or 2, 2
    return c.patch_size, c.embed_dim, depth or c.depth, c.num_heads


def estimate_bytes(variant: str, model: str, img_size: int, batch: int, grad_checkpointing: bool,
                   precision: str = "fp32", tiny: bool = False, depth: int | None = None) -> int:
    """Rough peak of one forward + backward (activations, gradients, temporaries), bytes.

    Per block the encoder keeps ~20 (B, L, D) tensors for the backward pass; with checkpointing
    one per block, plus ~60 while a block is recomputed and backpropagated (MLP hidden, SDPA
    temporaries; fitted to the CPU measurements in benchmarks/). Dense attention adds its
    (B, h, L, L) bias, probabilities and their gradients (4 of them); chunked ~8 chunk biases.
    """
    patch, dim, depth, heads = arch(model, tiny, depth)
    e = ELEMENT_BYTES[precision]
    length = 1 + (img_size // patch) ** 2
    token = batch * length * dim * e

    def attention_bytes(n: int, count: int, mode: str) -> int:
        dense = 4 * batch * count * heads * n * n * e  # bias, probabilities and their gradients
        if mode == "auto":
            mode = "dense" if n <= DENSE_MAX_TOKENS or dense <= 4 * DENSE_BIAS_BYTES else "chunked"
        return dense if mode == "dense" else min(dense, 8 * CHUNK_BIAS_BYTES)

    if variant == "windowed":
        tiles = math.ceil((img_size // patch) / WINDOW) ** 2
        square = max(attention_bytes(length, 1, "auto"), attention_bytes(1 + WINDOW ** 2, tiles, "auto"))
    else:
        square = attention_bytes(length, 1, variant)
    params = 12 * depth * dim * dim * 4 * 2  # weights' gradients
    if grad_checkpointing:
        return depth * token + 60 * token + square + params
    return depth * (20 * token + square) + params


def model_flops(model: str, img_size: int, batch: int, tiny: bool = False, depth: int | None = None) -> int:
    """Analytic FLOPs of forward + backward (3× forward; checkpointing's recomputation excluded)."""
    patch, dim, depth, _ = arch(model, tiny, depth)
    length = 1 + (img_size // patch) ** 2
    per_block = 2 * batch * length * dim * 12 * dim + 4 * batch * length * length * dim
    return 3 * depth * per_block


def available_bytes(device: str) -> int | None:
    """Memory a new step may use now: CUDA free memory, or MemAvailable of this machine; None where the OS does not
    say (Windows, whose os has no sysconf; macOS, whose sysconf has no SC_AVPHYS_PAGES)."""
    if device.startswith("cuda"):
        import torch  # CUDA's free memory: torch is already imported where --device resolved to CUDA

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _child(spec: dict) -> dict:
    """Run :func:`lomar.bench.backbone.run_variant` in a fresh interpreter; its last stdout line is the JSON
    result."""
    cmd = [sys.executable, "-m", "lomar.bench.backbone", json.dumps(spec)]
    env = os.environ.copy()
    if spec["device"] == "cpu":  # freed blocks go back to the OS: the resident set tracks live tensors
        env.update(MALLOC_MMAP_THRESHOLD_=str(_MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(_MMAP_THRESHOLD))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return dict(status="ok", **json.loads(lines[-1]))
    if proc.returncode in (-9, 137):
        why = "killed by SIGKILL (out of memory?)"
    elif proc.returncode < 0:
        why = f"stopped by signal {signal.Signals(-proc.returncode).name}"
    else:
        why = f"exit code {proc.returncode}"
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
    return dict(status="failed", reason=f"{why}: {tail}" if tail else why)


def bench_backbone(model: str, sizes: list[int], variants: list[str], batch_size: int, grad_checkpointing: bool,
                   device: str, precision: str = "fp32", steps: int = 1, warmup: int = 1,
                   threads: int | None = None, tiny: bool = False, say=lambda msg: None,
                   on_record=lambda records: None, depth: int | None = None, encoders=("lomar",),
                   on_runtime=lambda runtime: None) -> list[dict]:
    """One record per (size, variant, encoder), in the order given; see the module docstring.

    ``depth`` overrides the model's number of blocks (the cost of fewer blocks, for quick checks).
    ``on_record(records)`` is called after each record (to save partial results of a long run);
    ``on_runtime(runtime)`` with each child's torch version, thread count and machine name.
    """
    records = []
    for size in sizes:
        flops = model_flops(model, size, batch_size, tiny, depth)
        for variant, encoder in ((v, e) for v in variants for e in encoders):
            need = estimate_bytes(variant, model, size, batch_size, grad_checkpointing, precision, tiny, depth)
            free = available_bytes(device)
            rec = dict(task="backbone", method=model, attention=variant, encoder=encoder, img_size=size, windows=None,
                       window_setting="-", batch_size=batch_size, grad_checkpointing=grad_checkpointing,
                       precision=precision, compile=False, device=device, flops=flops, flops_kind="analytic",
                       depth=arch(model, tiny, depth)[2], estimated_bytes=need, available_bytes=free, step_s=None,
                       images_per_s=None, achieved_flops=None, peak_mem_bytes=None, peak_mem_kind=None,
                       step_times_s=[])  # what a variant that did not run reports
            # lomar.models.attention.flex_available's rule, on the device's name: a torch.device needs torch
            if variant == "flex" and device.partition(":")[0] != "cuda":
                rec.update(status="skipped", reason="flex needs CUDA (FlexAttention has no CPU backward)")
            elif free is not None and need > 0.9 * free:  # memory unknown: run it, a child that dies is a record
                rec.update(status="skipped", reason=f"estimated {need / 2**30:.1f} GiB > 90% of the "
                           f"{free / 2**30:.1f} GiB available")
            else:
                say(f"{size}px {variant} {encoder}: estimated {need / 2**30:.2f} GiB, running")
                spec = dict(model=model, img_size=size, variant=variant, encoder=encoder, batch_size=batch_size,
                            device=device, grad_checkpointing=grad_checkpointing, precision=precision, steps=steps,
                            warmup=warmup, threads=threads, tiny=tiny, depth=depth)
                result = _child(spec)
                if "runtime" in result:
                    on_runtime(result.pop("runtime"))
                rec.update(result)
            if rec["status"] == "ok":
                step_s = sorted(rec["step_times_s"])[len(rec["step_times_s"]) // 2]
                rec.update(step_s=step_s, images_per_s=batch_size / step_s, achieved_flops=flops / step_s)
            peak = "unknown" if rec["peak_mem_bytes"] is None else f"{rec['peak_mem_bytes'] / 2**20:,.0f} MiB"
            say(f"{size}px {variant} {encoder}: {rec['status']}" + (f" {rec['step_s']:.2f} s, peak {peak}"
                if rec["status"] == "ok" else f" ({rec['reason']})"))
            records.append(rec)
            on_record(records)
    return records


def format_table(records: list[dict]) -> str:
    head = (f"{'px':>5} {'attention':<9} {'encoder':<14} {'status':<8} {'s/step':>8} {'spread':>6} {'peak mem':>10} "
            f"{'estimate':>10}  note")
    lines = [head, "-" * len(head)]
    for r in records:
        ok = r["status"] == "ok"
        step = f"{r['step_s']:.2f}" if ok else "-"
        spread = stats.spread(r.get("step_times_s") or ()) if ok else "-"
        peak = f"{r['peak_mem_bytes'] / 2**20:,.0f} MiB" if ok and r["peak_mem_bytes"] is not None else "-"
        lines.append(f"{r['img_size']:>5} {r['attention']:<9} {r.get('encoder', 'lomar'):<14} {r['status']:<8} "
                     f"{step:>8} {spread:>6} {peak:>10} "
                     f"{r['estimated_bytes'] / 2**20:>6,.0f} MiB  {r.get('reason', '')}")
    lines.append(stats.SPREAD_LEGEND)
    return "\n".join(lines)
