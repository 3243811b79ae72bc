"""Where a training step's time goes: one profiled step, its kernels summed by name and by kind.

The MFU of a step says how far it is from the GEMM ceiling, not why. A profile of the same step
does: on CUDA the device time of every kernel (CUDA-graph replays included), on CPU the self time
of every operator. Kernels are grouped into kinds a reader can act on: matrix products (``gemm``,
the only kind that runs near the ceiling), ``attention``, ``fused`` (compiler-generated kernels
for the elementwise work and norms), ``optimizer``, and ``other`` (eager elementwise, copies).
"""

from __future__ import annotations

import os
from collections import defaultdict

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from lomar.bench.timing import StepRunner, sync

__all__ = ["KINDS", "kernel_kind", "profile_step"]

KINDS = ("gemm", "attention", "fused", "optimizer", "other")
# Name fragments (lowercase), first match wins: attention before gemm (flash kernels call their tiles
# gemms), the optimizer before fused (a compiled optimizer step is a triton kernel too).
_FRAGMENTS = (
    ("attention", ("attention", "fmha", "flash", "sdpa", "softmax_warp")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::baddbmm", "triton_tem", "mkldnn", "convolution", "conv2d")),
    ("fused", ("triton_", "cpp_fused", "torch-compiled region", "compiledfunction")),
)


def kernel_kind(name: str) -> str:
    """The kind (one of :data:`KINDS`) of a kernel or operator called ``name``."""
    low = name.lower()
    for kind, fragments in _FRAGMENTS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def profile_step(runner: StepRunner, top: int = 20) -> dict:
    """Profile one training step of ``runner`` (warm already: call after timing it).

    Returns ``{"clock": "cuda" | "cpu", "total_ms", "shares": {kind: fraction of total},
    "top": [{"name", "kind", "ms", "share", "calls"}, ...]}`` (the ``top`` longest names). On CUDA
    the times are the kernels' device time; on CPU each operator's self time (no double counting).
    """
    cuda = runner.device.type == "cuda"
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # else the profiler reports a missing GPU as an ERROR on CPU
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(runner.device)
    with profile(activities=activities) as prof:
        runner.step()
        sync(runner.device)
    times: dict[str, float] = defaultdict(float)  # microseconds
    calls: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if cuda and event.device_type == DeviceType.CUDA:
            micros = event.device_time_total
        elif not cuda and event.device_type == DeviceType.CPU:
            micros = event.self_cpu_time_total
        else:
            continue
        times[event.name] += micros
        calls[event.name] += 1
    total = sum(times.values()) or 1.0
    shares = dict.fromkeys(KINDS, 0.0)
    for name, micros in times.items():
        shares[kernel_kind(name)] += micros / total
    ranked = sorted(times, key=times.get, reverse=True)[:top]
    return dict(clock="cuda" if cuda else "cpu", total_ms=total / 1000, shares=shares,
                top=[dict(name=n, kind=kernel_kind(n), ms=times[n] / 1000, share=times[n] / total, calls=calls[n])
                     for n in ranked])
