"""Measurement machinery behind ``lomar bench``: training steps, FLOPs, memory, GEMM ceiling.

Kept apart from :mod:`lomar.cli.bench` (the command) so that building the CLI parser does not
import torch. Everything here measures one *training step*: forward, backward and an
AdamW update, exactly what pretraining repeats.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter as fc
from torch.utils.flop_counter import FlopCounterMode

from lomar.bench.host import peak_rss_bytes
from lomar.methods import get_method
from lomar.models.masking import grid_size
from lomar.models.vit import model_config
from lomar.tokenizers import DVAEConfig, DVAEEncoder
from lomar.train.config import PretrainConfig
from lomar.train.runtime import compile_model, fast_adamw

__all__ = ["sync", "timed", "flop_counter", "resident_bytes", "StepRunner", "method_config", "build_runner",
           "GemmCeiling", "interleaved_times", "failure", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_aten = torch.ops.aten


# torch's FLOP counter knows the CUDA SDPA kernels but not CPU flash attention, which computes the same
# products: without the same formulas every attention matmul on CPU would count as zero FLOPs. The
# registered entries are already shape-wrapped: shared, not re-wrapped.
for _suffix in ("", "_backward"):
    _cpu = getattr(_aten, f"_scaled_dot_product_flash_attention_for_cpu{_suffix}", None)
    if _cpu is not None and _cpu not in fc.flop_registry:
        fc.flop_registry[_cpu] = fc.flop_registry[getattr(_aten, f"_scaled_dot_product_flash_attention{_suffix}")]


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    """The gradient's four products (dV, dP, dQ, dK): twice the forward's two."""
    return 2 * fc.sdpa_flop_count(query_shape, key_shape, value_shape)


# The step's model FLOPs, as MFU defines them: torch counts a fused attention kernel's backward with its
# recomputation of the scores, five products, while the same attention run as plain matmuls (LoMaR's
# biased attention on CPU) counts four, so the same model counted differently by kernel (0.4 GFLOP an
# image of LoMaR at 448 px / 9 windows, CUDA against CPU; 2.2 % of MAE's step at 448 px).
_MODEL_FLOPS = {op: _attention_backward_flops for op in (
    getattr(_aten, name, None) for name in (
        "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_cudnn_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward"))
    if op is not None}


def flop_counter() -> FlopCounterMode:
    """A counter of model FLOPs: attention's backward counts its four products whatever kernel runs it."""
    return FlopCounterMode(display=False, custom_mapping=_MODEL_FLOPS)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of ``fn()``, timed from the host (device synchronised before and after)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@dataclass
class StepRunner:
    """One model + optimizer + fixed input batch; ``step()`` runs one full training step."""

    method: str
    img_size: int
    windows: int | None
    batch_size: int
    model: nn.Module
    forward: Callable[..., Any]  # (images, **inputs) -> the model's output: the compiled model when compiling
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    scaler: torch.amp.GradScaler  # enabled for fp16 only; disabled, it passes the loss and the step through
    # The batch's masking (plan= or noise=), drawn once outside the step as the data workers draw it.
    inputs: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    flops: int = 0
    decoder_flops: int = 0
    encoder_tokens: int = 0  # per image, as the encoder's first block sees them
    peak_mem: tuple[int, str] = (-1, "none")
    error: str | None = None  # why this configuration stopped (interleaved_times): out of memory, a compile error
    trace: str | None = None  # that error's traceback, where it may be a bug (see failure)

    def release(self) -> None:
        """Drop the model, optimizer and batch, so that a failed configuration's memory goes to the others."""
        self.model = self.forward = self.optimizer = self.images = None
        self.inputs = {}

    def _loss(self, eager: bool = False) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            if eager:  # FLOPs are counted on the eager model: the counter sees aten ops, not compiled kernels
                return self.model(self.images, **self.inputs).loss
            if self.forward is not self.model:  # CUDA graphs: the previous step's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            return self.forward(self.images, **self.inputs).loss

    def step(self, flops: FlopCounterMode | None = None) -> None:
        """forward + backward + optimizer step; no host synchronisation inside.

        With ``flops`` the forward and backward run under that counter (the optimizer
        update does no matmuls, so it is left out).
        """
        with flops if flops is not None else contextlib.nullcontext():
            self.scaler.scale(self._loss(eager=flops is not None)).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def count_flops(self) -> int:
        """Run one step and return the model FLOPs of its forward + backward (:func:`flop_counter`);
        ``decoder_flops``: the part in the model's decoder modules (MAE's), 0 where it has none;
        ``encoder_tokens``: the tokens an image gives the encoder (all its windows'), 0 where no block is found."""
        counter = flop_counter()
        # the work each method's encoder does per image: MAE's visible tokens against LoMaR's windows x tokens
        first = next((m for name, m in self.model.named_modules() if name.endswith("blocks.0") and
                      not name.startswith("decoder")), None)
        seen: list[int] = []
        hook = first and first.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[:2].numel()))
        try:
            self.step(counter)
        finally:
            if hook:
                hook.remove()
        self.encoder_tokens = seen[0] // self.batch_size if seen else 0
        self.flops = int(counter.get_total_flops())
        counts = counter.get_flop_counts()  # per module, each including its submodules' counts
        parts = [name for name in counts if name.split(".")[1:2] and name.split(".")[1].startswith("decoder")]
        self.decoder_flops = int(sum(sum(counts[name].values()) for name in parts
                                     if not any(name.startswith(outer + ".") for outer in parts)))
        return self.flops

    def measure_memory(self) -> None:
        """One untimed step that records ``peak_mem`` (bytes, kind).

        CUDA: ``torch.cuda.max_memory_allocated`` over the step (everything live, weights
        and optimizer state included). CPU: growth of the process's resident set over its
        level just before the step, sampled every 2 ms from /proc after freed heap is handed
        back to the OS (malloc_trim): activations, gradients and temporaries, NOT the weights
        and optimizer state already resident. Approximate by nature. Kept out of the timed
        steps because handing memory back makes the next step fault it in again.
        """
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            sync(self.device)
            self.peak_mem = int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        else:
            with contextlib.suppress(OSError, AttributeError):  # hand freed heap back to the OS first
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            if resident_bytes() is None:  # this OS tells neither: memory unknown, the step still runs
                self.step()
                return
            with _rss_range() as rss:
                self.step()
            self.peak_mem = rss[1] - rss[0], "cpu_rss_growth"


def resident_bytes() -> int | None:
    """This process's resident set size; without procfs (macOS) its high-water mark, which only grows; None where
    neither is known (Windows)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


@contextlib.contextmanager
def _rss_range(interval: float = 0.002):
    """[start, peak] resident set size over the block, sampled in a thread (torch ops release the GIL)."""
    rss, stop = [resident_bytes()] * 2, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss[1] = max(rss[1], resident_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield rss
    finally:
        stop.set()
        thread.join()
        rss[1] = max(rss[1], resident_bytes())


def method_config(variant: str, img_size: int, windows: int | None, **settings):
    """A bench variant (:func:`lomar.methods.variant_name`'s names: ``mae_window`` is ``--method mae``
    with windows) -> its :class:`~lomar.methods.base.Method` and a pretraining config at its default
    mask ratio, pretrain's defaults otherwise (its window placement too). LoMaR takes ``windows`` (None: the
    whole image); the other methods are global unless the name ends in ``_window``."""
    name, windowed, _ = variant.partition("_window")
    method = get_method(name)
    n = int(windows or 0) if windowed or method.default_windows is None else method.default_windows
    return method, PretrainConfig(method=name, img_size=img_size, windows=n, mask_ratio=method.default_mask_ratio,
                                  **settings)


def build_runner(method: str, model_name: str, img_size: int, windows: int | None, batch_size: int,
                 device: torch.device, precision: str, compile: bool, seed: int = 0,
                 tiny: bool = False, compile_mode: str = "default", pos: str | None = None) -> StepRunner:
    """The training step of a bench variant (:func:`method_config`), built by its method as ``lomar
    pretrain`` builds it, 7×7 windows, on random normalised images (N, 3, S, S).

    BEiT's tokenizer is a DALL-E dVAE encoder of the original size (n_hid 256, 2 blocks per group,
    vocabulary 8192; random weights, which cost the same as trained ones) labelling the second view
    at grid × 8 px in no_grad, inside the timed and FLOP-counted forward.
    ``tiny`` shrinks encoder, decoder and dVAE to width 32 (dVAE 8), depth 1, 2 heads (tests only).
    ``compile_mode``: torch.compile's mode with ``compile`` (``lomar pretrain --compile-mode``'s choices).
    ``pos``: the encoder's position scheme (``model_config``'s choices); None: the method's default.
    """
    decoder = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2) if tiny else {}
    spec, config = method_config(method, img_size, windows, **decoder)  # windows placed as lomar pretrain places them
    overrides = dict(embed_dim=32, depth=1, num_heads=2) if tiny else {}
    vit = model_config(model_name, img_size=img_size, pos=pos or spec.default_pos, **overrides)
    grid = grid_size(img_size, vit.patch_size)
    dvae = DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=64) if tiny else DVAEConfig()
    torch.manual_seed(seed)
    model = spec.build(config, vit, **({"tokenizer": DVAEEncoder(dvae)} if spec.name == "beit" else {}))
    model.to(device).train()
    optimizer = fast_adamw([p for p in model.parameters() if p.requires_grad],
                           lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    # The batch's masking, drawn per sample as the data workers draw it: no random draw in the step.
    masker, generator = spec.masker(config, grid), torch.Generator().manual_seed(seed)
    samples = [masker(generator) for _ in range(batch_size)]
    inputs = spec.forward_kwargs(config, grid)({k: torch.stack([s[k] for s in samples]) for k in samples[0]}, device)
    forward = compile_model(model, compile_mode, dynamic=False) if compile else model  # one fixed shape per runner
    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return StepRunner(method, img_size, config.windows or None, batch_size, model, forward, optimizer, images,
                      device, dtype, scaler, inputs)


class GemmCeiling:
    """Times an n×n×n GEMM in the bench's dtype; a call returns the achieved FLOP/s.

    Called between rounds of training steps, so that it sees the same machine state. On CPU the
    ceiling is the faster of the two GEMM libraries torch carries: ``torch.mm`` (MKL in fp32) and
    oneDNN's matmul. They can differ twofold (MKL's fp32 GEMM reaches under half of oneDNN's on
    AMD Zen 5), and a ceiling below what the machine does would put the MFU of steps whose products
    run in oneDNN (convolutions, bf16) above 100 %. ``rates`` keeps every library's measurements.
    """

    def __init__(self, device: torch.device, precision: str, n: int | None = None):
        self.n = n or (2048 if device.type == "cpu" else 8192)
        self.device, self.reps = device, 1 if device.type == "cpu" else 20
        a, b, out = (torch.randn(self.n, self.n, device=device, dtype=DTYPES[precision]) for _ in range(3))
        self.kernels = {"torch.mm": lambda: torch.mm(a, b, out=out)}
        onednn = _onednn_linear(a, b) if device.type == "cpu" else None
        if onednn is not None:
            self.kernels["oneDNN"] = onednn
        self.rates: dict[str, list[float]] = {name: [] for name in self.kernels}
        self._measure()  # warm-up, not kept

    def _measure(self) -> dict[str, float]:
        return {name: 2 * self.n ** 3 * self.reps / timed(lambda k=kernel: [k() for _ in range(self.reps)], self.device)
                for name, kernel in self.kernels.items()}

    def __call__(self) -> float:
        rates = self._measure()
        for name, rate in rates.items():
            self.rates[name].append(rate)
        return max(rates.values())

    def medians(self) -> dict[str, float]:
        """Each library's median rate over the calls so far; the ceiling is the largest."""
        return {name: statistics.median(rates) for name, rates in self.rates.items()}

    def per_call(self) -> list[float]:
        """What each call returned: the faster library's rate of that call."""
        return [max(rates) for rates in zip(*self.rates.values())]


def _onednn_linear(a: torch.Tensor, b: torch.Tensor) -> Callable[[], object] | None:
    """``a @ b.T`` through oneDNN (its own tensor layout), or None where oneDNN lacks this dtype."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        a_blocked, b_blocked = a.to_mkldnn(), b.to_mkldnn()
        torch._C._nn.mkldnn_linear(a_blocked, b_blocked, None)
    except (RuntimeError, AttributeError):  # a dtype oneDNN lacks here; AttributeError: a torch without the op
        return None
    return lambda: torch._C._nn.mkldnn_linear(a_blocked, b_blocked, None)


def failure(exc: BaseException) -> tuple[str, str | None]:
    """An error as a results row gives it: (its type and the first line of its message, its traceback where the
    failure may be a bug: a shape mismatch in a method's step is a RuntimeError too; None for running out of
    memory, which the line says whole)."""
    line = (str(exc).strip().splitlines() or [""])[0][:300]
    trace = None if isinstance(exc, torch.OutOfMemoryError) else "".join(traceback.format_exception(exc))
    return (f"{type(exc).__name__}: {line}" if line else type(exc).__name__), trace


def _label(r: StepRunner) -> str:
    return f"{r.method} {r.img_size}px" + (f" {r.windows} windows" if r.windows else "")


def interleaved_times(runners: list[StepRunner], steps: int, warmup: int,
                      gemm: Callable[[], object] | None = None,
                      progress: Callable[[str], None] = lambda msg: None,
                      on_change: Callable[[], None] = lambda: None) -> None:
    """Warm every runner up, then run ``steps`` rounds of one step each, A B A B …

    Untimed first, per runner: one step that counts FLOPs, one that records peak memory,
    then ``warmup`` plain steps.

    Interleaving makes slow drifts of the machine (other load, clocks) hit every
    configuration alike. ``gemm`` (a :class:`GemmCeiling`) is called once per round, before its steps.
    A runner whose step raises a RuntimeError (out of memory, a compile or CUDA error) gets it as its
    ``error`` (and ``trace``), is released and leaves the rotation; the others go on. ``on_change()`` follows every
    round and every such failure (to save what is measured so far).
    """
    live = list(runners)

    def each(stage: str, work: Callable[[StepRunner], object]) -> None:
        for r in list(live):
            try:
                work(r)
                continue
            except RuntimeError as exc:  # this configuration's, not the bench's: the rest are still worth timing
                line, r.trace = failure(exc)
                r.error = f"{stage}: {line}"
            live.remove(r)
            r.release()
            if r.device.type == "cuda":
                torch.cuda.empty_cache()
            progress(f"{_label(r)} failed at its {r.error}")
            on_change()

    each("FLOP-counting step", StepRunner.count_flops)
    each("memory step", StepRunner.measure_memory)

    def warm(r: StepRunner) -> None:  # after every runner's memory step, so that timed steps reuse the heap
        for _ in range(warmup):
            r.step()
        sync(r.device)
        progress(f"warmed up {_label(r)}")

    each("warm-up", warm)
    for i in range(steps):
        if gemm is not None:
            gemm()
        each(f"timed step {i + 1}", lambda r: r.times.append(timed(r.step, r.device)))
        progress(f"round {i + 1}/{steps}: " + ", ".join(f"{r.times[-1]:.2f}s" for r in live))
        on_change()
