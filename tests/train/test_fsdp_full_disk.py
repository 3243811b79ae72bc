"""A sharded save that fails for want of space (a full disk on any rank's files, a read-only folder, a full quota):
one line on every rank, the quota named, and the last checkpoint kept."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fsdp_ranks import _model

from helpers import free_port
from lomar.checkpoints.io import safe_load


def _full_disk_worker(rank: int, world: int, port: int, out: str, where: str) -> None:
    """Save once, then save again with a full disk hitting rank 1's shards or rank 0's meta.pt (or rank 1's
    shards meeting a folder gone read-only); each rank writes what the second save raised to ``out/rank<r>.txt``."""
    import contextlib
    import errno
    from unittest import mock

    from lomar.train.fsdp import save_sharded, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = shard_model(_model(), "fp32")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        save_sharded(model, optimizer, f"{out}/sharded", {"step": 0})
        if where == "shards" and rank == 1:
            def zip_writer_on_a_full_disk(*args, **kwargs):  # what torch.save inside DCP raised on a real one
                try:
                    raise OSError(errno.ENOSPC, "No space left on device")
                except OSError:
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

            patch = mock.patch("torch.distributed.checkpoint.filesystem._write_item", zip_writer_on_a_full_disk)
        elif where == "read-only" and rank == 1:
            patch = mock.patch("torch.distributed.checkpoint.filesystem._write_item",
                               side_effect=OSError(errno.EROFS, "Read-only file system"))
        elif where == "meta" and rank == 0:
            patch = mock.patch("lomar.train.fsdp.atomic_save",
                               side_effect=OSError(errno.ENOSPC, "No space left on device"))
        else:
            patch = contextlib.nullcontext()
        with patch:
            try:
                save_sharded(model, optimizer, f"{out}/sharded", {"step": 1})
                raised = "nothing"
            except Exception as exc:  # noqa: BLE001 - the test records whatever came out
                raised = f"{type(exc).__name__}: {exc}"
        with open(f"{out}/rank{rank}.txt", "w") as f:
            f.write(raised)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["shards", "meta", "read-only"])
def test_a_full_disk_during_a_sharded_save_is_one_line_on_every_rank_and_keeps_the_last_checkpoint(tmp_path,
                                                                                                    where):
    # a folder gone read-only is one line, as on a single process, not DCP's multi-rank traceback
    mp.start_processes(_full_disk_worker, args=(2, free_port(), str(tmp_path), where), nprocs=2,
                       start_method="fork")
    for rank in range(2):
        raised = (tmp_path / f"rank{rank}.txt").read_text()
        expected = "cannot write" if where == "read-only" else "no space left on the device to write"
        assert raised.startswith(f"SaveError: {expected} {tmp_path / 'sharded'}"), (rank, raised)
        assert "\n" not in raised and "resume with --resume auto" in raised
    assert not (tmp_path / "sharded.tmp").exists()  # the partial folder is gone
    from lomar.checkpoints.sharded import consolidate

    consolidate(tmp_path / "sharded", tmp_path / "single.pt")  # the first save is whole
    assert safe_load(tmp_path / "single.pt")["step"] == 0


def test_a_sharded_save_over_a_full_quota_names_the_quota(tmp_path):
    # df shows the device's free space to a user whose quota is used up: "no space left on the device" misleads
    import errno

    from lomar.train.fsdp import _agree_on_failure
    from lomar.train.run_state import SaveError

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for code, words in ((errno.EDQUOT, "no space left in the disk quota"),
                            (errno.ENOSPC, "no space left on the device")):
            with pytest.raises(SaveError) as info:
                _agree_on_failure(OSError(code, os.strerror(code)), tmp_path / "sharded", tmp_path / "sharded.tmp")
            assert str(info.value).startswith(f"{words} to write {tmp_path / 'sharded'}; ")
            assert info.value.errno == code
    finally:
        dist.destroy_process_group()
