"""Defaults a run takes from the machine: threads and loader workers from its cores, --precision auto from what
its CPU or GPU multiplies natively."""

from __future__ import annotations

import pytest
import torch

from lomar.train import runtime
from lomar.train.precision import resolve_precision


def test_thread_and_worker_defaults_fit_the_machine(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (runtime.default_threads(), runtime.default_workers()) == (2, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.default_threads() == 1
    monkeypatch.setattr(runtime, "available_cores", lambda: 1)
    assert (runtime.default_threads(), runtime.default_workers()) == (1, 0)
    monkeypatch.setattr(runtime, "available_cores", lambda: 64)
    assert runtime.default_workers() == 8


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, "fp32"), (True, False, "bf16"),
                                                         (False, True, "bf16")])
def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_auto_precision_is_bf16_only_where_the_gpu_multiplies_bf16(monkeypatch, native, expected):
    """A T4 or V100 runs bf16 emulated, slower than fp32: torch's is_bf16_supported() says yes to it by default."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert resolve_precision("auto", torch.device("cuda")) == expected
