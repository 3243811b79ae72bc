"""Fast settings for the machine we train on: the C allocator, the optimizer kernel, the compiler.

PyTorch's CPU allocator is the C library's malloc. glibc serves blocks above its mmap
threshold (at most 32 MiB) with fresh ``mmap`` calls and unmaps them on free, so a ViT-B
training step that allocates activations of 50-100 MiB gets them as new zero pages every
step: a quarter of a million page faults, about 10 % of the step time on a 2-core machine
(measured: LoMaR 448 px / 9 windows, 6.0 -> 5.4 s/step). Training repeats the same
allocations every step, so keeping freed memory in the heap costs nothing but holding on
to the peak, which the next step needs anyway.

AdamW: torch's fused kernel exists for CPU as well as CUDA and is 7x faster than the
foreach loop on CPU (ViT-B/16, 2 threads: 44 vs 317 ms per update).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["retain_freed_memory", "fast_adamw", "compile_model", "available_cores", "default_threads",
           "default_workers", "use_threads", "keep_grads_allocated"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ONE_GIB = 1 << 30
_applied = False


def retain_freed_memory() -> bool:
    """Tell glibc malloc to serve large blocks from the heap and keep freed memory.

    Returns True when the setting is in effect (Linux with glibc), False otherwise. Set
    ``LOMAR_DEFAULT_MALLOC=1`` to leave the allocator alone (e.g. to use jemalloc or tcmalloc
    through ``LD_PRELOAD``, which solve the same problem). Idempotent; the process that calls it
    and the DataLoader workers it forks after (they inherit it) are affected; spawned workers keep glibc's defaults.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("LOMAR_DEFAULT_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Blocks up to 1 GiB come from the heap; the heap top is never returned while in use.
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _ONE_GIB)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def fast_adamw(params: Iterable[Any], **kwargs: Any):
    """``torch.optim.AdamW`` with the fused kernel, or the foreach one where fused is missing."""
    import torch

    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # no fused kernel for this device / dtype
        return torch.optim.AdamW(params, foreach=True, **kwargs)



def compile_model(model: Any, mode: str = "default", **options: Any) -> Any:
    """``torch.compile(model)`` in ``mode`` (``--compile-mode``'s choices; "default" is torch's default).

    With CUDA graphs (reduce-overhead, max-autotune) a step's outputs live in memory that the next
    replay overwrites: the caller marks each step's start (``torch.compiler.cudagraph_mark_step_begin``)
    and copies what it keeps across steps.
    """
    import torch

    return torch.compile(model, mode=None if mode == "default" else mode, **options)


def keep_grads_allocated(model: Any, mode: str) -> bool:
    """Whether a model compiled in ``mode`` must keep its gradients allocated, each given zeros now where it has none.

    Under CUDA graphs (reduce-overhead, max-autotune) a backward returns the gradients in memory that the next replay
    reuses, and a parameter whose .grad is None takes that memory as its .grad: the next micro-batch then overwrites
    the gradient it should add to (pytorch/pytorch#169545). Gradients that stay allocated are added to instead; where
    every parameter gets a gradient each step (as DDP requires), zeros instead of None change no update.
    """
    if mode not in ("reduce-overhead", "max-autotune"):
        return False
    import torch

    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
    return True


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API on this platform
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Torch CPU threads per process: the cores, shared among the processes torchrun starts on
    this machine (more only oversubscribes the cores: a tiny pretrain ran 80x slower)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, available_cores() // max(1, local))


def use_threads(threads: int | None) -> None:
    """Set torch's CPU threads to ``threads`` (--threads), else to :func:`default_threads`: a command that owns its
    process sets torch's global thread count."""
    import torch

    torch.set_num_threads(threads or default_threads())


def default_workers() -> int:
    """Data-loading worker processes: one core left for the training process, at most 8
    (0 on a 1-core machine: loading then runs in the training process)."""
    return max(0, min(8, available_cores() - 1))
