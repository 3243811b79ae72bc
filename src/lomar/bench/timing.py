"""Measurement machinery behind ``lomar bench``: training steps, FLOPs, memory, GEMM ceiling.

Kept apart from :mod:`lomar.cli.bench` (the command) so that building the CLI parser does not
import torch. Everything here measures one *training step*: forward, backward and an
AdamW update, exactly what pretraining repeats.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import flop_counter as fc
from torch.utils.flop_counter import FlopCounterMode

from lomar.bench.methods import build_variant_model
from lomar.models import MAE, LoMaR
from lomar.models.vit import model_config
from lomar.train.runtime import fast_adamw

__all__ = ["StepRunner", "build_runner", "draw_inputs", "gemm_ceiling", "interleaved_times", "median", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_aten = torch.ops.aten


def _register_cpu_sdpa_flops() -> None:
    """torch's FLOP counter knows the CUDA SDPA kernels but not CPU flash attention.

    Without this, every attention matmul on CPU would count as zero FLOPs. The CPU
    kernel computes the same products, so it gets the same formulas.
    """
    fwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    # The registered entries are already shape-wrapped; share them rather than re-wrap.
    if fwd is not None and fwd not in fc.flop_registry:
        fc.flop_registry[fwd] = fc.flop_registry[_aten._scaled_dot_product_flash_attention]
    if bwd is not None and bwd not in fc.flop_registry:
        fc.flop_registry[bwd] = fc.flop_registry[_aten._scaled_dot_product_flash_attention_backward]


_register_cpu_sdpa_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepRunner:
    """One model + optimizer + fixed input batch; ``step()`` runs one full training step."""

    method: str
    img_size: int
    windows: int | None
    batch_size: int
    model: nn.Module
    forward: Callable[..., torch.Tensor]  # (images, **inputs) -> loss: the compiled step when compiling
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    scaler: torch.amp.GradScaler | None = None
    # The batch's masking (plan= or noise=), drawn once outside the step as the data workers draw it.
    inputs: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    flops: int = 0
    peak_mem: tuple[int, str] = (-1, "none")

    def _loss(self, eager: bool = False) -> torch.Tensor:
        autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                    if self.dtype != torch.float32 else contextlib.nullcontext())
        with autocast:
            # FLOPs are counted on the eager model: the counter sees aten ops, not compiled kernels.
            if eager:
                return self.model(self.images, **self.inputs).loss
            return self.forward(self.images, **self.inputs)

    def step(self, flops: FlopCounterMode | None = None) -> None:
        """forward + backward + optimizer step; no host synchronisation inside.

        With ``flops`` the forward and backward run under that counter (the optimizer
        update does no matmuls, so it is left out).
        """
        with flops if flops is not None else contextlib.nullcontext():
            loss = self._loss(eager=flops is not None)
            if self.scaler is not None:
                loss = self.scaler.scale(loss)
            loss.backward()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def count_flops(self) -> int:
        """Run one step and return the FLOPs of its forward + backward (exact count)."""
        counter = FlopCounterMode(display=False)
        self.step(counter)
        self.flops = int(counter.get_total_flops())
        return self.flops

    def timed_step(self) -> float:
        """One step, timed from the host (device synchronised before and after)."""
        _sync(self.device)
        start = time.perf_counter()
        self.step()
        _sync(self.device)
        elapsed = time.perf_counter() - start
        self.times.append(elapsed)
        return elapsed

    def measure_memory(self) -> tuple[int, str]:
        """One untimed step that records ``peak_mem`` (bytes, kind).

        CUDA: ``torch.cuda.max_memory_allocated`` over the step (everything live, weights
        and optimizer state included). CPU: growth of the process's resident set over its
        level just before the step, sampled every 2 ms from /proc after freed heap is handed
        back to the OS (malloc_trim): activations, gradients and temporaries, NOT the weights
        and optimizer state already resident. Approximate by nature. Kept out of the timed
        steps because handing memory back makes the next step fault it in again.
        """
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            _sync(self.device)
            self.peak_mem = int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        else:
            _malloc_trim()
            with _RssSampler() as sampler:
                self.step()
            self.peak_mem = sampler.peak - sampler.start, "cpu_rss_growth"
        return self.peak_mem


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _RssSampler:
    """Samples the resident set size in a thread (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self.start = self.peak = 0

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # no procfs: fall back to the (monotone) high-water mark
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def build_runner(method: str, model_name: str, img_size: int, windows: int | None, batch_size: int,
                 device: torch.device, precision: str, compile: bool, seed: int = 0,
                 tiny: bool = False) -> StepRunner:
    """A LoMaR (``windows`` per image, 7×7, ratio 0.8) or MAE (ratio 0.75, decoder 512×8, 16
    heads) training step at ``img_size``; random normalised images (N, 3, S, S).

    ``tiny`` shrinks encoder and decoder to width 32, depth 1, 2 heads (tests only).
    """
    torch.manual_seed(seed)
    overrides = dict(embed_dim=32, depth=1, num_heads=2) if tiny else {}
    decoder = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2) if tiny else {}
    if method in ("beit", "beit_window", "mae_window"):
        model: nn.Module = build_variant_model(method, model_name, img_size, windows, tiny)
    elif method == "lomar":
        model = LoMaR(model_config(model_name, img_size=img_size, pos="rpe", **overrides),
                                 num_windows=int(windows))
    elif method == "mae":
        model = MAE(model_config(model_name, img_size=img_size, pos="abs", **overrides), **decoder)
    else:
        raise ValueError(f"unknown method {method!r}")
    model.to(device).train()
    optimizer = fast_adamw([p for p in model.parameters() if p.requires_grad],
                           lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    inputs = draw_inputs(model, images, seed)
    fn = torch.compile(model, dynamic=False) if compile else model  # one fixed shape per runner

    def forward(x: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        return fn(x, **kw).loss

    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return StepRunner(method, img_size, windows if method != "mae" else None, batch_size, model,
                      forward, optimizer, images, device, dtype, scaler, inputs)


def draw_inputs(model: nn.Module, images: torch.Tensor, seed: int = 0) -> dict:
    """The masking of one batch, drawn eagerly as training's data workers do: ``plan=`` for the
    window methods, ``noise=`` (N, L) for MAE. Keeps random draws out of the compiled step."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, MAE) and not hasattr(model, "sample_plan"):
        grid = model.encoder.image_grid(images)
        noise = torch.rand(images.shape[0], grid[0] * grid[1], generator=generator)
        return {"noise": noise.to(images.device)}
    return {"plan": model.sample_plan(images, generator).to(images.device)}


def gemm_ceiling(device: torch.device, precision: str, n: int | None = None) -> Callable[[], float]:
    """A closure timing one n×n×n GEMM in the bench's dtype; returns achieved FLOP/s.

    Measured interleaved with the training steps, so that it sees the same machine state.
    """
    n = n or (2048 if device.type == "cpu" else 8192)
    dtype = DTYPES[precision]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    reps = 1 if device.type == "cpu" else 20

    def measure() -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        _sync(device)
        return 2 * n ** 3 * reps / (time.perf_counter() - start)

    measure()  # warm-up
    return measure


def interleaved_times(runners: list[StepRunner], steps: int, warmup: int,
                      gemm: Callable[[], float] | None = None,
                      progress: Callable[[str], None] | None = None) -> list[float]:
    """Warm every runner up, then run ``steps`` rounds of one step each, A B A B …

    Untimed first, per runner: one step that counts FLOPs, one that records peak memory,
    then ``warmup`` plain steps.

    Interleaving makes slow drifts of the machine (other load, clocks) hit every
    configuration alike. Returns the GEMM rates measured once per round (if ``gemm``).
    """
    for r in runners:
        r.count_flops()
        r.measure_memory()
    for r in runners:  # after every runner's memory step, so that timed steps reuse the heap
        for _ in range(warmup):
            r.step()
        _sync(r.device)
        if progress:
            progress(f"warmed up {r.method} {r.img_size}px" + (f" {r.windows} windows" if r.windows else ""))
    rates: list[float] = []
    for i in range(steps):
        if gemm is not None:
            rates.append(gemm())
        for r in runners:
            r.timed_step()
        if progress:
            progress(f"round {i + 1}/{steps}: " + ", ".join(f"{r.times[-1]:.2f}s" for r in runners))
    return rates


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")
