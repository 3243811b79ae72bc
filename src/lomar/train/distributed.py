"""torch.distributed set-up for runs started by ``torchrun`` (DDP; gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lomar.errors import UsageError
from lomar.train.runtime import retain_freed_memory

__all__ = ["DistInfo", "init_distributed", "join_group", "cleanup_distributed", "any_rank", "rank_max", "main_rank_out",
           "sync_stats"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick the device.

    ``device``: 'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N' (under torchrun, 'cuda' is the
    LOCAL_RANK's GPU, or the one GPU a launcher shows the process, and 'cuda:N' is refused where several processes
    of a machine would share it). On CPU the C allocator is also told to keep freed memory
    (:func:`lomar.train.runtime.retain_freed_memory`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    given = device  # a refusal names the value the user gave (or the default's), not 'auto''s choice
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for CUDA but none is available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", _local_gpu(given, local) if world > 1 else torch.cuda.current_device())
        elif world > 1 and (here := int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)) > 1 \
                and torch.cuda.device_count() > 1 and dev.index != local:
            # NCCL refuses two ranks on one GPU at their first collective, in a traceback of every rank. A process
            # shown one GPU only (a launcher's CUDA_VISIBLE_DEVICES for each) is not refused: cuda:0 is its own; nor
            # is one given its LOCAL_RANK's index (a wrapper's --device cuda:$LOCAL_RANK), which 'cuda' would pick.
            raise ValueError(f"--device {device} under torchrun: all {here} processes of this machine would use GPU "
                             f"{dev.index}; pass --device cuda (or auto): each process takes its LOCAL_RANK's GPU")
        torch.cuda.set_device(dev)
    else:
        retain_freed_memory()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local), dev


def _local_gpu(device: str, local: int) -> int:
    """The GPU index of torchrun's process ``local`` (LOCAL_RANK) on its machine: ``local`` where the process sees
    the machine's GPUs (torchrun's way), 0 where a launcher shows each process its own GPU alone (CUDA_VISIBLE_DEVICES
    of one GPU), which ``local`` would not name (torch.cuda.set_device: 'invalid device ordinal'); a ValueError where
    there are fewer GPUs than processes."""
    count = torch.cuda.device_count()
    if local < count:
        return local
    if count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES"):
        return 0
    raise ValueError(f"--device {device} under torchrun: LOCAL_RANK {local} but this process sees {count} GPU(s); "
                     f"start at most {count} process(es) a machine (torchrun --nproc-per-node {count}), or show each "
                     f"its own GPU (CUDA_VISIBLE_DEVICES)")


def join_group(device: str) -> tuple[DistInfo, torch.device]:
    """:func:`init_distributed` for a command: what keeps it from starting (no CUDA, a process group that cannot form:
    torchrun's variables missing, a failed rendezvous) is the one-line UsageError of a bad setting, naming
    ``--device`` where torch's message does not."""
    try:
        return init_distributed(device)
    except (ValueError, RuntimeError) as exc:
        message = str(exc).splitlines()[0]
        raise UsageError(message if "--device" in message else f"--device {device}: {message}") from None


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_max(value: float, device: torch.device) -> float:
    """The largest ``value`` of this process's and every other rank's (a collective under DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    agreed = torch.tensor(float(value), device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return float(agreed)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on this process or any other rank (a collective under DDP)."""
    return bool(rank_max(float(flag), device))


def main_rank_out(config) -> str:
    """``config.out``, made the main rank's on every rank (a collective under torchrun): the default ``--out``,
    runs/<time>, is each process's own clock's, and processes that read it in different seconds wrote one sharded
    checkpoint into two folders (the one ``last.json`` names lacked a rank's shards)."""
    if dist.is_available() and dist.is_initialized():
        shared = [config.out]
        dist.broadcast_object_list(shared, src=0)
        config.out = shared[0]
    return config.out


def sync_stats(module: torch.nn.Module) -> None:
    """The main rank's buffers on every rank (a collective under torchrun). DDP broadcasts them before a training
    forward only, after which each rank's BatchNorm updates its statistics from its own batch: an evaluation then
    scored each rank's share with other statistics, a score no model had, not the saved one's (rank 0's)."""
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
