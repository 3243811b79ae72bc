"""A resume on another number of processes than the run's: it goes on as the same run where the global batch
(``--batch-size`` x ``--accum-steps`` x processes) is kept, since rank r reads positions r, r+N, ... of each epoch's
order (:class:`~lomar.data.samplers.EpochSampler`) and a step's micro-batches of every rank together then hold the
same samples on any number of processes; elsewhere it is refused, naming the values that keep it. Torch-free: the
settings' resolution refuses before anything is built."""

from __future__ import annotations

from typing import Any

__all__ = ["processes_of", "launch_with", "process_change", "other_processes", "other_processes_note"]


def processes_of(checkpoint: dict | None) -> int | None:
    """How many processes trained the run of ``checkpoint`` (its RNG states, one a rank); None when it does not say
    (saved before every rank's were kept, or not read)."""
    ranks = (checkpoint or {}).get("rng_ranks")
    return len(ranks) if isinstance(ranks, list) and ranks else None


def launch_with(count: int) -> str:
    """How to launch ``count`` processes, as a refusal's fix says it: 'launch it ...'."""
    if count == 1:
        return "as one process, without torchrun"
    return f"with {count} (torchrun --nproc-per-node {count}, or --nnodes × --nproc-per-node = {count} over several " \
           "machines)"


def process_change(saved: dict[str, Any], was: int, given: dict[str, Any], now: int) -> str | None:
    """The refusal of a resume on ``now`` processes, with ``given``'s batch_size and accum_steps, of a run that ``was``
    trained with ``saved``'s, where its global batch (batch x accum x processes) would change: the lr a --blr gives,
    the steps of an epoch and the samples of each step depend on it. None where it is kept: rank r reads positions
    r, r+N, ... of the epoch's order (:class:`~lomar.data.samplers.EpochSampler`), so a step's micro-batches of every
    rank together hold the same samples on any number of processes."""
    batch, accum = saved["batch_size"], saved.get("accum_steps") or 1
    total, new_batch, new_accum = batch * accum * was, given["batch_size"], given.get("accum_steps") or 1
    if new_batch * new_accum * now == total:
        return None
    if was == now:
        same = f"--batch-size {batch}" if new_accum == accum else f"--batch-size {batch} --accum-steps {accum}"
        return (f"--resume: --batch-size {new_batch} x --accum-steps {new_accum} changes this run's global batch "
                f"({batch} x accum {accum} x {was} process(es) = {total}); pass {same}, or start a new run with "
                f"another --out")
    keep, each = [], total // now
    if total % now == 0:
        if each % new_accum == 0:
            keep.append(f"--batch-size {each // new_accum}")
        if "accum_steps" in saved and each % new_batch == 0:
            keep.append(f"--accum-steps {each // new_batch}")
        if not keep:
            keep.append(f"--batch-size {each} --accum-steps 1")
    kept = f"keep the global batch with {' or '.join(keep)} on {now} process(es), " if keep else ""
    return (f"--resume: this run was trained by {was} process(es) and this launch has {now}; its global batch "
            f"({batch} x accum {accum} x {was} = {total}), the lr it gives and its place in the epoch's data order "
            f"depend on that: {kept}launch it {launch_with(was)}, or start a new run with another --out")


def other_processes(ckpt: dict, batch_size: int, accum: int, now: int) -> tuple[int, int] | None:
    """(the processes that trained the run, the --accum-steps it trained with) where ``ckpt`` was saved by another
    number of processes than ``now`` or with another --accum-steps than ``accum``, and ``batch_size`` x ``accum``
    keep its global batch; None where both are the same (or the number unknown: saved before every rank's RNG
    states were kept). ValueError where another number cannot go on: its global batch would change
    (:func:`process_change`). An FSDP run's sharded state goes on too: DCP records each tensor's global shape and
    its chunks, and reads onto any sharding what each rank's new shards need (:func:`lomar.train.fsdp.load_sharded`)."""
    was = processes_of(ckpt)
    if was is None:
        return None
    # pretrain's settings are its "config"; finetune's "config" is its model's, its settings "settings" (or "args")
    saved = next((ckpt[k] for k in ("settings", "config", "args") if isinstance(ckpt.get(k), dict)
                  and "batch_size" in ckpt[k]), {})
    given = {"batch_size": batch_size, "accum_steps": accum}
    refusal = process_change({**given, **{k: saved[k] for k in given if isinstance(saved.get(k), int)}}, was, given,
                             now)
    if was == now:  # another --accum-steps keeping the global batch (the settings' check): each rank's samples
        return (was, saved["accum_steps"]) if refusal is None and saved.get("accum_steps", accum) != accum else None
    if refusal:
        raise ValueError(refusal)
    return was, saved.get("accum_steps") or accum


def other_processes_note(was: int, now: int, step: int, batch_size: int, accum: int, per_process: bool,
                         shards: bool, sharded: bool) -> str:
    """The start-up note of a resume on ``now`` processes of a run that ``was`` trained, its global batch kept
    (:func:`other_processes`); ``per_process``: the run draws from each process's own random stream (drop path,
    mixup), ``shards``: it reads tar shards, dealt to the processes, ``sharded``: its model and optimizer state are
    FSDP's, sharded over the processes."""
    head = (f"{was} → {now} process(es) after step {step}, the global batch kept ({batch_size} x accum {accum} x "
            f"{now} = {batch_size * accum * now})")
    if sharded:
        head += f", the FSDP model and optimizer state resharded over {now}"
    why = [what for what, true in (("each process draws from its own random stream (drop path, mixup)", per_process),
                                   ("tar shards are dealt to the processes anew each epoch", shards)) if true]
    if why:
        return f"{head}: {' and '.join(why)}, so it goes on as the same run statistically, not bit for bit"
    return (f"{head}: each step reads the same samples as on {was}, so it goes on as the same run, up to the order "
            f"of floating-point sums")
