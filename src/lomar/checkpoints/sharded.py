"""A sharded checkpoint folder (``lomar pretrain --fsdp``, written by torch.distributed.checkpoint)
read back as the single-file form, in one process and without a process group."""

from __future__ import annotations

from pathlib import Path

from lomar.checkpoints.io import atomic_save, safe_load
from lomar.checkpoints.reader import PRETRAIN_FORMAT

__all__ = ["read_sharded", "consolidate"]


def read_sharded(sharded_dir: str | Path) -> dict:
    """``{"model", "step", "epoch", "config", "model_spec", "format", ...}`` of a ``checkpoint-N.dcp`` folder.

    The optimizer state is left out (exact resume uses the sharded folder); the result is what
    ``lomar export`` and evaluation read.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sharded_dir = Path(sharded_dir)
    if not (sharded_dir / ".metadata").exists():
        raise ValueError(f"{sharded_dir} is not a sharded checkpoint (no .metadata); pass a "
                         f"checkpoint-NNNNNN.dcp folder of a `lomar pretrain --fsdp` run")
    # Every tensor into memory, in this process alone: what torch's dcp_to_torch_save does,
    # without its intermediate file (whose failure on a full disk names no cause).
    full: dict = {}
    _load_state_dict(full, storage_reader=FileSystemReader(str(sharded_dir)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    meta = safe_load(sharded_dir / "meta.pt") if (sharded_dir / "meta.pt").exists() else {}
    state = {"model": {k: v.contiguous() for k, v in full["model"].items()}, **meta}
    state.setdefault("format", PRETRAIN_FORMAT)
    return state


def consolidate(sharded_dir: str | Path, out_file: str | Path) -> Path:
    """:func:`read_sharded`, written atomically to ``out_file``."""
    return atomic_save(read_sharded(sharded_dir), Path(out_file))
