"""The random streams of a training process: seeded alike (the same initial weights on every rank), then
one per rank; saved in checkpoints for every rank and restored, so that a resumed run continues exactly."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist

from lomar.train.distributed import DistInfo

__all__ = ["seed_everything", "rng_state", "set_rng_state", "gather_rng_states", "restore_rng_states"]


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(device: torch.device | None = None) -> dict:
    """torch / numpy / python RNG states, and ``device``'s when it is a CUDA device (drop path draws
    there), as tensors and plain data (loadable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    # The normal samplers' cached second value too (numpy's, python's gauss): timm's mixup draws its
    # beta through numpy's, and a resume without it would draw the next one afresh.
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])],
             "python": list(py_state[1]), "python_version": py_state[0], "python_gauss": py_state[2]}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`'s ``state``; its tensors may be on ``device`` (a checkpoint read onto the GPU):
    the generators take their states from host memory only ('RNG state must be a torch.ByteTensor')."""
    torch.set_rng_state(state["torch"].cpu())
    has_gauss, gauss = state.get("numpy_gauss", (0, 0.0))  # a checkpoint written before it was saved: none
    np.random.set_state(("MT19937", state["numpy"].cpu().numpy().astype(np.uint32), state["numpy_pos"], has_gauss,
                         gauss))
    random.setstate((state["python_version"], tuple(state["python"]), state.get("python_gauss")))
    if "cuda" in state and device is not None and device.type == "cuda":  # a CPU resume has no use for it
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def gather_rng_states(info: DistInfo, device: torch.device) -> list[dict]:
    """Every rank's :func:`rng_state`, in rank order (a collective under DDP)."""
    if not info.enabled:
        return [rng_state(device)]
    states: list = [None] * info.world_size
    dist.all_gather_object(states, rng_state(device))
    return states


def restore_rng_states(ckpt: dict, info: DistInfo, device: torch.device, seed: int) -> None:
    """This rank's streams from a checkpoint's ``rng_ranks`` (:func:`gather_rng_states`: one a process that trained
    the run), or an older checkpoint's ``rng``, rank 0's alone. A rank the checkpoint holds none for gets a fresh
    stream of its own: a rank past 0 of an older checkpoint, or of a resume on more processes than the run had, which
    :func:`~lomar.train.process_count.other_processes` lets go on where the global batch is kept and refuses
    otherwise."""
    ranks = ckpt.get("rng_ranks")
    if ranks is None and "rng" in ckpt:
        ranks = [ckpt["rng"]]
    if ranks is None:
        return
    if info.rank < len(ranks):
        set_rng_state(ranks[info.rank], device)
    else:
        seed_everything(seed + info.world_size * (ckpt.get("step", 0) + 1) + info.rank)
