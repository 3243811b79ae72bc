"""A run's numeric precision: ``auto`` resolved for the device, and the autocast context of each."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["resolve_precision", "cpu_has_bf16", "autocast_factory"]


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where the hardware multiplies bf16 natively (CUDA with bf16 support, a CPU
    with AVX-512 BF16 or AMX), else fp32."""
    if precision == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_has_bf16()
        return "bf16" if native else "fp32"
    return precision


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions. With them oneDNN runs bf16 autocast's products
    at 2-4x its fp32 rate; without them bf16 is emulated and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_factory(precision: str, device: torch.device):
    """A zero-argument callable giving the autocast context of a resolved precision."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)
