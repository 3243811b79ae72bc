"""The eager training step of every method never makes the host wait for the device.

On a GPU each read of a tensor's value (``int(t)``, ``bool(t)``, ``.item()``, ``nonzero``) and each
blocking copy to the device makes the host wait for the work queued before it, so it cannot queue
the next step's kernels meanwhile. The training loop reads the loss once a step on purpose (its
non-finite check); the model, the optimizer and the step's inputs wait for nothing. On the CPU the
same reads are seen by ``helpers.host_reads``.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers import host_reads
from lomar.bench.timing import build_runner

CPU = torch.device("cpu")


def test_the_counter_sees_the_reads_a_step_could_make():
    with host_reads() as reads:
        t = torch.tensor([0, 3, 1])
        int(t.max()), bool(t.any()), t.nonzero(), t[t > 0], t.tolist()
    assert reads == {"aten._local_scalar_dense.default": 2, "aten.nonzero.default": 1, "aten.index.Tensor": 1,
                     "tolist": 1}


@pytest.mark.parametrize("method,windows", [("lomar", 2), ("mae", None), ("mae_window", 2), ("beit", None),
                                            ("beit_window", 2)])
def test_the_training_step_reads_nothing_back(method, windows):
    # The plan as the training loop builds it (collated, checked on the host, then moved): MAE with
    # windows sized its visible tokens by int(mask count) and BEiT its slots by int(counts.max()).
    runner = build_runner(method, "vit_base_patch16", 128, windows, 2, CPU, "fp32", False, tiny=True)
    runner.step()  # first-call set-up (caches) is not the steady step
    with host_reads() as reads:
        runner.step()
    assert not reads, dict(reads)


def test_lomar_drawing_its_own_plan_reads_nothing_back():
    # The others count a plan they draw themselves (MAE with windows, BEiT) or seed its blockwise masks
    # from the generator (BEiT): outside the training loop, which hands them plans counted on the host.
    runner = build_runner("lomar", "vit_base_patch16", 128, 2, 2, CPU, "fp32", False, tiny=True)
    with host_reads() as reads:
        runner.model(runner.images, generator=torch.Generator().manual_seed(3)).loss.backward()
    assert not reads, dict(reads)


class Copies(TorchFunctionMode):
    """Records the ``non_blocking`` of every ``Tensor.to``."""

    def __init__(self):
        super().__init__()
        self.non_blocking = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            self.non_blocking.append(bool((kwargs or {}).get("non_blocking", False)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method,windows", [("lomar", 2), ("mae", 0), ("mae", 2), ("beit", 0)])
def test_the_steps_masking_goes_to_the_device_without_blocking(method, windows):
    # The images were copied with non_blocking=True but the plan (or MAE's noise) was not: from the loader's
    # pinned memory, a blocking copy waits for the previous step's optimizer update to finish on the GPU.
    from types import SimpleNamespace

    from lomar.methods import get_method
    from lomar.methods.base import method_runtime

    config = SimpleNamespace(method=method, img_size=64, window_size=3, windows=windows,
                             mask_ratio=get_method(method).default_mask_ratio)
    runtime = method_runtime(config, 16)
    samples = [runtime.masker(torch.Generator().manual_seed(i)) for i in range(2)]
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    with Copies() as copies:
        runtime.forward_kwargs(batch, CPU)
    assert copies.non_blocking and all(copies.non_blocking), copies.non_blocking
