"""Sharded training for large encoders: FSDP2 (``fully_shard``) per transformer block, sharded
checkpoints through ``torch.distributed.checkpoint`` (DCP), and conversion of a sharded
checkpoint to the usual single file.

Each block is its own FSDP unit, so at most one block's full parameters (plus the root's
embeddings, norm and head) are gathered at a time; the root unit takes what remains. With
``precision="bf16"`` parameters are gathered and computed in bf16 while gradients are reduced
and kept, with the optimizer state, in fp32 (``MixedPrecisionPolicy``).

A sharded checkpoint is a folder written by every rank (DCP), holding ``model`` and
``optimizer`` (keyed by parameter name, whatever the sharding), and ``meta.pt`` (step, epoch,
config, …, written by rank 0). It is written to ``<dir>.tmp`` and renamed when every rank has finished, so a
crash leaves the previous checkpoint intact. :func:`consolidate` turns one into the usual
``{"model", "step", "epoch", "config", "format"}`` file, without the process group; from a shell:
``python -m lomar.train.fsdp consolidate RUN/checkpoint-000100.dcp OUT.pt``.

In a run folder (``lomar pretrain --fsdp``) :func:`save_run_checkpoint` writes
``checkpoint-<step>.dcp/`` and points ``last.json`` at the newest (see ``run_state``).
"""

from __future__ import annotations

import argparse
import errno
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

from lomar.checkpoints.io import atomic_save, refuse_link, remove_tree, safe_load, write_error
from lomar.checkpoints.sharded import check_metadata, consolidate, refusal, safe_planner, safe_reader
from lomar.errors import FULL_DISK, UNWRITABLE, UsageError
from lomar.train.run_state import checkpoints_to_prune, point_last_at, save_error

__all__ = ["shard_model", "block_modules", "save_sharded", "load_sharded", "save_run_checkpoint"]


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a LoMaR / MAE model or a bare encoder, in order."""
    blocks: list[nn.Module] = []
    for name in ("encoder.blocks", "blocks", "decoder_blocks", "decoder.blocks"):
        module: nn.Module | None = model
        for part in name.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            blocks += [b for b in module if not any(b is seen for seen in blocks)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to shard")
    return blocks


def shard_model(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """Apply FSDP2 to every block, then to the root, over every rank; returns ``model`` (sharded in place).

    ``precision``: "fp32", or "bf16" (bf16 gather and compute, fp32 gradients and optimizer
    state). Call after moving the model to its device and before building the optimizer. Without a process group
    (one process: a sharded run resumed without torchrun) it forms one of this process alone, so that the run's
    state stays sharded (DTensors over one rank) and its checkpoints sharded folders.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"FSDP precision must be fp32 or bf16, got {precision!r}")
    device = next(model.parameters()).device.type
    if not dist.is_initialized():  # the run's end destroys it (distributed.cleanup_distributed)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" else MixedPrecisionPolicy())
    # before fully_shard: hooks run in the order registered, so FSDP's own sees the copies
    model.register_forward_hook(_copy_views)
    for module in (*block_modules(model), model):
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return model


def _copy_views(module: nn.Module, inputs, output):
    """The root's outputs with each view that needs a gradient (MAE's prediction, its cls token's row cut off) copied.
    FSDP hooks its backward on them, and on a view it warns, from every process at every launch, that an in-place
    op there would skip the all-gather and give wrong gradients; a copy is no view (and no lomar loss writes into
    an output in place). NamedTuple outputs are walked as tuples."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t.requires_grad and t._base is not None
                    else t, output)


def _writer(directory: Path):
    """DCP's file writer, whose failures keep their OSError: DCP sends each rank's exception to the
    others pickled, which drops the OSError behind e.g. torch.save's RuntimeError."""
    import torch.distributed.checkpoint as dcp

    class Writer(dcp.FileSystemWriter):
        def write_data(self, plan, planner):
            try:
                return super().write_data(plan, planner)
            except Exception as exc:
                error = write_error(exc, directory)
                if error is None:
                    raise
                raise error from exc

    return Writer(str(directory))


def _failure_code(failure: BaseException | None) -> int:
    """0 none, 3 a full disk (4 a full quota), 2 a folder that cannot be written, 1 anything else; of ``failure``
    (an OSError, or DCP's exception wrapping each rank's). The writers involved (:func:`_writer`, DCP's metadata pickle,
    ``atomic_save``) fail with the OSError itself, so it is found without a chain of causes (which DCP's
    pickling drops anyway)."""
    from torch.distributed.checkpoint.api import CheckpointException

    if failure is None:
        return 0
    causes = [exc for exc, _ in failure.failures.values()] if isinstance(failure, CheckpointException) else [failure]
    errnos = {exc.errno for exc in causes if isinstance(exc, OSError)}
    if errnos & set(FULL_DISK):
        return 4 if errno.EDQUOT in errnos else 3  # a quota is named as one
    return 2 if errnos & set(UNWRITABLE) else 1


def _agree_on_failure(failure: BaseException | None, directory: Path, tmp: Path) -> None:
    """Collective: if any rank failed to write its part, every rank raises (rank 0 having removed
    the partial ``tmp``); a full disk or an unwritable folder anywhere is a one-line SaveError on all ranks."""
    nccl = dist.get_backend() == "nccl"  # reduces CUDA tensors only
    verdict = torch.tensor([_failure_code(failure)],
                           device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)  # every rank has finished its part when this returns
    if not verdict.item():
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if verdict.item() > 1:
        code = {4: errno.EDQUOT, 3: errno.ENOSPC}.get(verdict.item(), errno.EACCES)
        raise save_error(code, directory, "nothing written before it was changed") from None
    if failure is not None:
        raise failure
    raise RuntimeError(f"another rank could not write its part of {directory}; see its error")


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path, meta: dict) -> Path:
    """Every rank writes its shards of model and optimizer into ``directory`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if dist.get_rank() == 0:
        refuse_link(directory)  # a link of its name would be moved aside, then removed
        if tmp.exists() or tmp.is_symlink():
            remove_tree(tmp)  # a crash during an earlier save
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    failure: BaseException | None = None
    try:
        dcp.save({"model": model_state, "optimizer": optim_state}, storage_writer=_writer(tmp))
    except CheckpointException as exc:  # raised on every rank when any rank's write failed
        failure = exc
    if failure is None and dist.get_rank() == 0:
        try:
            atomic_save(dict(meta), tmp / "meta.pt")  # DCP loads only keys it is given: keep meta apart
        except OSError as exc:
            failure = exc
    _agree_on_failure(failure, directory, tmp)
    if dist.get_rank() == 0:
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier()
    return directory


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path,
                 meta: dict | None = None) -> dict:
    """Load a sharded checkpoint into a sharded model and its optimizer (collective); -> meta (``meta``: its
    meta.pt as already read, else read here).

    The number of ranks may differ from the one that saved: DCP reshards on load.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = Path(directory)
    if not (directory / ".metadata").exists():
        raise ValueError(f"{directory} is not a sharded checkpoint (no .metadata); pass the folder save_sharded wrote")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        check_metadata(directory)  # here: a refusal inside DCP is logged with tracebacks, then wrapped
    except ValueError as exc:
        raise UsageError(f"--resume: {exc}") from None
    try:
        dcp.load(state, storage_reader=safe_reader(directory), planner=safe_planner())
    except CheckpointException as exc:  # DCP wraps each rank's error; a refused entry is the user's to fix
        if (refused := refusal(exc)) is exc:
            raise
        raise UsageError(f"--resume {directory}: {refused}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return meta if meta is not None else safe_load(directory / "meta.pt")


def save_run_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict, out: str | Path,
                        step: int, keep_last: int) -> Path:
    """``out/checkpoint-<step>.dcp`` (collective), then rank 0 points ``out/last.json`` at it and
    prunes the sharded checkpoints to the ``keep_last`` newest; -> the folder written."""
    out = Path(out)
    path = save_sharded(model, optimizer, out / f"checkpoint-{step:06d}.dcp", meta)
    if dist.get_rank() == 0:
        # The pointer is written after the folder is complete: it never names a partial checkpoint.
        point_last_at(out, path, step)
        for old in checkpoints_to_prune(list(out.glob("checkpoint-*.dcp")), keep_last):
            if old.name != path.name:
                remove_tree(old, ignore_errors=True)
    dist.barrier()
    return path


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lomar.train.fsdp",
                                     description="Turn a sharded checkpoint folder into one checkpoint file.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("consolidate", help="SHARDED_DIR OUT_FILE: write the model and run metadata to OUT_FILE")
    cmd.add_argument("sharded_dir")
    cmd.add_argument("out_file")
    args = parser.parse_args(argv)
    # what every lomar command's lines begin with, the command as typed (lomar.cli.app.command_prefix's rule; train
    # does not import cli): 'python -m lomar.train.fsdp consolidate'
    prefix = cmd.prog
    try:
        path = consolidate(args.sharded_dir, args.out_file)
    except (ValueError, OSError) as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{prefix}: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
