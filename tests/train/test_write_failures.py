"""Saves and writes that fail (a full disk, a quota, a folder gone unwritable): the previous checkpoint kept, one
line saying which state is intact and how to resume, and every rank stopping together."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from toy_run import ToyConfig, ToyTask

from helpers import _state, fill_disk, free_port
from lomar.checkpoints.io import atomic_save, safe_load
from lomar.train.lifecycle import run
from lomar.train.run_resume import find_resume_point
from lomar.train.run_state import SaveError, save_checkpoint, save_on_main_rank


def test_a_full_disk_keeps_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    save_checkpoint(_state(1), tmp_path, step=1, keep_last=2)

    fill_disk(monkeypatch, room=64)  # torch.save's zip writer meets ENOSPC part-way, as on a real disk
    with pytest.raises(SaveError) as info:
        save_checkpoint(_state(2), tmp_path, step=2, keep_last=2)
    message = str(info.value)
    assert "no space left" in message and "last.pt is intact" in message and "\n" not in message
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert safe_load(tmp_path / "last.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001.pt", "last.pt"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_folder_gone_unwritable_mid_run_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, code):
    # a file system remounted read-only, or a folder whose permissions changed: the traceback-free line said
    # "choose a writable location" (exit 2, as for a bad flag), not that last.pt is intact and how to go on
    from lomar.checkpoints import io

    save_checkpoint(_state(1), tmp_path, step=1, keep_last=2)

    def refused(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(io, "open", refused, raising=False)
    with pytest.raises(SaveError) as info:
        save_checkpoint(_state(2), tmp_path, step=2, keep_last=2)
    monkeypatch.undo()
    assert str(info.value) == (f"cannot write {tmp_path / 'checkpoint-000002.pt'} ({os.strerror(code)}); "
                               f"{tmp_path / 'last.pt'} is intact; make {tmp_path} writable and resume with "
                               f"--resume auto")
    assert info.value.errno == code and safe_load(tmp_path / "last.pt")["step"] == 1


def test_a_disk_filled_by_the_step_checkpoint_names_it_as_the_intact_state(tmp_path, monkeypatch):
    """The first save of a run writes checkpoint-N.pt, then last.pt: if only the first fits, the
    state is safe in it, and the message says so (not "no earlier checkpoint")."""
    from lomar.train import run_state

    written = []

    def second_write_fails(state, path):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(atomic_save(state, path))

    monkeypatch.setattr(run_state, "atomic_save", second_write_fails)
    with pytest.raises(SaveError, match=r"last\.pt; .*checkpoint-000004\.pt is intact"):
        save_checkpoint(_state(4), tmp_path, step=4, keep_last=2)
    assert safe_load(tmp_path / "checkpoint-000004.pt")["step"] == 4
    assert find_resume_point(tmp_path).path.name == "checkpoint-000004.pt"


class FailsToStartOnMain(ToyTask):
    """The main process's start fails as pretrain's first figure does on a full disk."""

    def begin(self):
        raise OSError(errno.ENOSPC, "No space left on device", "reconstruction-000000.png")


def _save_worker(rank: int, world: int, port: int, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from lomar.train.distributed import cleanup_distributed

    torch.set_num_threads(1)
    # a rank left waiting in a collective fails after a minute instead of hanging the test
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        def full_disk():
            raise SaveError("no space left on the device to write last.pt")

        try:
            save_on_main_rank(full_disk, rank == 0, torch.device("cpu"))
            raised = "nothing"
        except Exception as exc:  # noqa: BLE001 - the test records whatever came out
            raised = f"{type(exc).__name__}: {exc}"
        written = save_on_main_rank(lambda: "written", rank == 0, torch.device("cpu"))
        from types import SimpleNamespace

        from lomar.train.distributed import main_rank_out

        # a default --out is each process's clock's: two that read it in different seconds split a sharded checkpoint
        folder = main_rank_out(SimpleNamespace(out=f"runs/2026120{rank}-000000"))
        dist.barrier()
        # a run's start (pretrain's first figure) is the main process's, shared as a save is: in this launch, as
        # spawning two more processes costs 20 s. The run joins this group and leaves it.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        try:
            run(ToyConfig(out=f"{out}/run", accum_steps=1), FailsToStartOnMain)
            started = "nothing"
        except Exception as exc:  # noqa: BLE001 - the test records whatever came out
            started = f"{type(exc).__name__}: {exc}"
        with open(f"{out}/rank{rank}.txt", "w") as f:
            f.write(f"{raised}|{written}|{folder}|{started}")
    finally:
        cleanup_distributed()
    os._exit(0)  # skip the interpreter's teardown, which gloo's threads can abort (lomar.cli.app.run)


@pytest.mark.slow
def test_a_failed_save_or_start_on_the_main_rank_stops_every_rank_together(tmp_path):
    # a start that failed on the main rank alone left the other in the first step's collective, said by it too
    import torch.multiprocessing as mp

    # forked: neither process imports torch, lomar and this module afresh, as spawned ones did (3-4 s)
    mp.start_processes(_save_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    assert (tmp_path / "rank0.txt").read_text() == \
        "SaveError: no space left on the device to write last.pt|written|runs/20261200-000000|" \
        "OSError: [Errno 28] No space left on device: 'reconstruction-000000.png'"
    assert (tmp_path / "rank1.txt").read_text() == \
        "SaveError: the main process could not write the checkpoint; see its message|None|runs/20261200-000000|" \
        "SaveError: the main process could not write the checkpoint; see its message"


def test_a_full_disk_mid_run_says_resume_not_rerun(tmp_path):
    # "then rerun" sent a training run's user to a command that refuses the folder the run holds
    from lomar.cli.app import describe_os_error

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    message, code = describe_os_error(full, "pretrain")
    assert code == 1 and message == (f"writing {tmp_path / 'metrics.jsonl'}: no space left on the device; free space, "
                                     f"then resume with --resume auto (from the last checkpoint, if one was written)")
    assert describe_os_error(full, "export")[0].endswith("free space or choose another location, then rerun")


def test_a_quota_is_named_a_quota_not_a_full_device(tmp_path, monkeypatch):
    # df shows free space on the device of a user whose quota is used up: "no space left on the device" misleads
    from lomar.cli.app import describe_os_error
    from lomar.train import run_state

    quota = OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "metrics.jsonl"))
    message, code = describe_os_error(quota, "pretrain")
    assert code == 1 and message.startswith(f"writing {tmp_path / 'metrics.jsonl'}: no space left in the disk quota; "
                                            f"free space, then resume"), message

    def over_quota(state, path):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(path))

    monkeypatch.setattr(run_state, "atomic_save", over_quota)
    with pytest.raises(SaveError) as info:
        run_state.save_state(_state(1), tmp_path / "last.pt", tmp_path / "last.pt")
    assert str(info.value) == (f"no space left in the disk quota to write {tmp_path / 'last.pt'}; no earlier "
                               f"checkpoint exists; free space and resume with --resume auto")
    assert info.value.errno == errno.EDQUOT
