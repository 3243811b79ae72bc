"""The random state a checkpoint keeps (lomar.train.rng): restored exactly, on the host or read onto a GPU, and
the device kind a resume is told from it."""

from __future__ import annotations

import pytest
import torch

from lomar.checkpoints.io import atomic_save, safe_load
from lomar.train.run_resume import numerics_notes


def test_the_saved_random_state_holds_the_normal_samplers_cached_value(tmp_path):
    import random

    import numpy as np

    from lomar.train.rng import rng_state, set_rng_state

    np.random.seed(3)
    random.seed(3)
    np.random.beta(1.0, 1.0)  # as timm's cutmix: the normal draw inside leaves one value cached
    random.gauss(0, 1)
    atomic_save({"rng": rng_state()}, tmp_path / "rng.pt")
    ahead = [np.random.beta(1.0, 1.0), np.random.standard_normal(), random.gauss(0, 1)]
    set_rng_state(safe_load(tmp_path / "rng.pt")["rng"])  # weights_only: plain data
    assert [np.random.beta(1.0, 1.0), np.random.standard_normal(), random.gauss(0, 1)] == ahead


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a checkpoint read onto a CUDA device")
def test_the_random_state_of_a_checkpoint_read_onto_the_gpu_is_restored(tmp_path):
    """A resume reads its checkpoint onto the run's device (task.preload), RNG states included: torch's generators
    refused them there ('RNG state must be a torch.ByteTensor'), so no single-file run resumed on CUDA."""
    from lomar.train.rng import rng_state, set_rng_state

    cuda = torch.device("cuda")
    atomic_save({"rng": rng_state(cuda)}, tmp_path / "rng.pt")
    ahead = [torch.rand(3), torch.rand(3, device=cuda).cpu()]
    set_rng_state(safe_load(tmp_path / "rng.pt", map_location=cuda)["rng"], cuda)
    assert all(torch.equal(a, b) for a, b in zip(ahead, [torch.rand(3), torch.rand(3, device=cuda).cpu()]))


class _OffHost(torch.Tensor):
    """A tensor held off the host, as a checkpoint read onto the GPU holds its RNG states (the meta device stands in
    for CUDA on a machine without one): only a copy to the host reads it."""

    @staticmethod
    def __new__(cls, held: torch.Tensor):
        tensor = torch.Tensor._make_wrapper_subclass(cls, held.shape, dtype=held.dtype, device="meta")
        tensor.held = held
        return tensor

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and (kwargs or {}).get("device") == torch.device("cpu"):
            return args[0].held.clone()
        raise TypeError(f"{func} reads a tensor off the host")


def test_the_device_kind_is_told_from_a_checkpoint_that_records_it_only():
    """A checkpoint holds a CUDA stream where its run trained on CUDA since every rank's states are kept (rng_ranks):
    an older one, a CUDA run's too, holds rank 0's host streams alone, and its GPU resume was told 'device cpu →
    cuda'."""
    rng, cuda = {"torch": torch.zeros(8, dtype=torch.uint8)}, torch.device("cuda")
    gpu_run = {"step": 5, "precision": "fp32", "rng": {**rng, "cuda": rng["torch"]}}
    assert numerics_notes({**gpu_run, "rng_ranks": [gpu_run["rng"]]}, "fp32", "fp32", cuda) == []
    assert numerics_notes({"step": 5, "precision": "fp32", "rng": rng}, "fp32", "fp32", cuda) == []
    cpu_run = {"step": 5, "precision": "fp32", "rng": rng, "rng_ranks": [rng]}
    assert numerics_notes(cpu_run, "fp32", "fp32", cuda) == [
        "device cpu → cuda after step 5: the weights and optimizer state move over; its kernels and device random "
        "draws (drop path) differ, so it does not go on bit for bit"]


def test_random_states_read_onto_another_device_are_restored_through_the_host():
    """task.preload maps a checkpoint onto the run's device, RNG states included, and torch's and numpy's generators
    read host memory only: a CUDA resume stopped on 'RNG state must be a torch.ByteTensor'. Runs without a GPU."""
    import random

    import numpy as np

    from lomar.train.rng import rng_state, set_rng_state

    state = rng_state()
    ahead = [torch.rand(3), np.random.rand(), random.random()]
    set_rng_state({k: _OffHost(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()})
    assert torch.equal(ahead[0], torch.rand(3)) and ahead[1:] == [np.random.rand(), random.random()]


def test_a_cuda_random_state_read_onto_the_gpu_is_handed_to_torch_from_the_host(monkeypatch):
    """The CUDA generator's state too: torch.cuda.set_rng_state takes a host ByteTensor (its generator's set_state
    raises 'RNG state must be a torch.ByteTensor' at CUDA's lazy start otherwise), and the run's device. Runs without
    a GPU: the state stands off the host (meta), the call is recorded."""
    from lomar.train.rng import rng_state, set_rng_state

    cuda_state, given = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: given.append((state, device)))
    state = {**rng_state(), "cuda": cuda_state}
    set_rng_state({k: _OffHost(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()},
                  torch.device("cuda", 1))
    ((handed, device),) = given
    assert handed.device.type == "cpu" and torch.equal(handed, cuda_state) and device == torch.device("cuda", 1)
    set_rng_state(state, torch.device("cpu"))  # a CPU resume leaves the CUDA generator alone
    assert len(given) == 1
