"""Allocator and optimizer settings of :mod:`lomar.train.runtime`."""

import ctypes.util
import os
import subprocess
import sys

import pytest
import torch

from lomar.train.runtime import fast_adamw

GLIBC = sys.platform.startswith("linux") and "libc.so.6" in (ctypes.util.find_library("c") or "")


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
@pytest.mark.parametrize("env, expected", [({}, "True"), ({"LOMAR_DEFAULT_MALLOC": "1"}, "False")])
def test_retain_freed_memory_applies_unless_opted_out(env, expected):
    # in a child process: the setting is process-wide and cannot be undone
    code = "from lomar.train.runtime import retain_freed_memory as r; print(r(), r())"
    out = subprocess.run([sys.executable, "-c", code], env={**_base_env(), **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [expected, expected]


def _base_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "LOMAR_DEFAULT_MALLOC"}


def test_fast_adamw_is_fused_on_cpu_and_matches_the_reference_update():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(a.detach().clone())
    fused = fast_adamw([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    plain = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        grad = torch.randn(64, 32)
        a.grad, b.grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
