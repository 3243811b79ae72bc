"""A run folder may come from elsewhere (a shared run, a tarball, a git checkout) holding links under the names a
run writes: lomar writes and reads its own files, never through a link to someone else's."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from lomar.checkpoints.io import atomic_write_bytes, open_in_place
from lomar.errors import UsageError
from lomar.train.monitor import Monitor
from lomar.train.run_lock import RunLock
from lomar.train.run_logs import truncate_metrics
from lomar.train.run_state import prepare_run_folder


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"  # a file of the user's, e.g. ~/.bashrc
    path.write_text('{"step": 1}\nprecious\n')
    return path


def _plant(out, name, target):
    out.mkdir(exist_ok=True)
    os.symlink(target, out / name)
    return out / name


def test_a_lock_file_linked_elsewhere_is_refused_not_truncated_to_the_pid(tmp_path, victim):
    _plant(tmp_path / "run", ".lock", victim)
    with pytest.raises(UsageError, match=r"run/\.lock is a symbolic link \(to .*victim.txt\), which lomar does not"):
        RunLock(tmp_path / "run").acquire()
    assert victim.read_text() == '{"step": 1}\nprecious\n'  # it held the run's pid


def test_logs_linked_elsewhere_are_neither_appended_to_nor_read(tmp_path, victim):
    _plant(tmp_path / "run", "metrics.jsonl", victim)
    with pytest.raises(UsageError, match="metrics.jsonl is a symbolic link"):
        Monitor(tmp_path / "run", active=True, total=1, log_every=1)
    with pytest.raises(UsageError, match="metrics.jsonl is a symbolic link"):
        truncate_metrics(tmp_path / "run" / "metrics.jsonl", step=5)  # a link to /dev/zero filled memory
    assert victim.read_text() == '{"step": 1}\nprecious\n'
    os.mkfifo(tmp_path / "fifo")  # opened for reading, a FIFO blocks until a writer comes
    with pytest.raises(UsageError, match="fifo is not a regular file"):
        open_in_place(tmp_path / "fifo").close()
    with pytest.raises(UsageError, match="fifo is not a regular file"):
        open_in_place(tmp_path / "fifo", "a").close()


def test_an_atomic_write_creates_its_temporary_itself_not_through_a_planted_link(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere" / "created.txt"  # a file the link's owner wants made, e.g. an autostart entry
    target.parent.mkdir()
    tokens = iter(["0" * 16, "1" * 16])  # the link planted at the first name the writer draws
    monkeypatch.setattr("secrets.token_hex", lambda n: next(tokens))
    link = _plant(tmp_path / "run", f".last.pt.tmp-{os.getpid()}-{'0' * 16}", target)
    atomic_write_bytes(tmp_path / "run" / "last.pt", b"weights")
    assert not target.exists() and os.path.islink(link)  # not its own: neither written through nor removed
    assert (tmp_path / "run" / "last.pt").read_bytes() == b"weights"
    assert oct((tmp_path / "run" / "last.pt").stat().st_mode & 0o777) == "0o644"


def test_overwrite_removes_a_linked_folder_of_a_runs_name_not_what_it_links_to(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    _plant(tmp_path / "run", "tb", tmp_path / "mine")
    config = SimpleNamespace(out=str(tmp_path / "run"), resume=None, overwrite=True, dump=lambda: "seed: 0\n")
    task = SimpleNamespace(name="pretrain", outputs=(), eval_log="knn.jsonl")
    prepare_run_folder(config, task, None, 0, 0)  # rmtree on the link raised an OSError traceback
    assert not os.path.lexists(tmp_path / "run" / "tb") and (tmp_path / "mine" / "thesis.tex").exists()


def test_tensorboard_writes_no_event_file_through_a_tb_link(tmp_path):
    (tmp_path / "mine").mkdir()
    _plant(tmp_path / "run", "tb", tmp_path / "mine")
    with pytest.raises(UsageError, match=r"run/tb is a symbolic link \(to .*mine\), which lomar does not write"):
        Monitor(tmp_path / "run", active=True, total=1, log_every=1)
    assert list((tmp_path / "mine").iterdir()) == []  # it held TensorBoard's events.out.tfevents.*
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused first, not left open


@pytest.mark.parametrize("when", ["at the start", "in the run"])
def test_a_failed_tensorboard_write_is_one_oserror_naming_the_folder(tmp_path, monkeypatch, when):
    import errno
    import threading

    from tensorboard.summary.writer.record_writer import RecordWriter

    printed = []  # what threading's hook would print: TensorBoard's writer thread's traceback
    monkeypatch.setattr(threading, "excepthook", printed.append)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "run").mkdir()
    if when == "at the start":
        monkeypatch.setattr(RecordWriter, "write", full)
    with pytest.raises(OSError) as raised:  # it had no file name, and on close nothing was raised at all
        monitor = Monitor(tmp_path / "run", active=True, total=2, log_every=1)
        monkeypatch.setattr(RecordWriter, "write", full)
        monitor.step(1, 0, 1.0, 1e-3, 10.0)
        monitor.close()
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(tmp_path / "run" / "tb"))
    for thread in threading.enumerate():
        if type(thread).__name__ == "_AsyncWriterThread":
            thread.join(5)
    assert printed == []


def test_a_linked_sharded_checkpoint_folder_is_refused_in_one_line_not_kept_or_a_traceback(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    out = tmp_path / "run"
    link = _plant(out, "checkpoint-000001.dcp", tmp_path / "mine")
    config = SimpleNamespace(out=str(out), resume="auto", overwrite=False, dump=lambda: "seed: 0\n")
    task = SimpleNamespace(name="pretrain", outputs=(), eval_log="knn.jsonl")
    with pytest.raises(UsageError, match=r"run/checkpoint-000001\.dcp is a symbolic link \(to .*mine\)"):
        prepare_run_folder(config, task, out / "last.pt", 2, 0)  # a resume: a sharded run would prune it
    import torch
    import torch.distributed as dist

    from lomar.train.fsdp import save_run_checkpoint

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        # pruned, the link was kept silently (rmtree's ignore_errors); saved over, rmtree raised a traceback
        with pytest.raises(UsageError, match=r"run/checkpoint-000001\.dcp is a symbolic link"):
            save_run_checkpoint(model, optimizer, {"step": 2}, out, 2, keep_last=1)
        assert (out / "checkpoint-000002.dcp" / "meta.pt").is_file()
        with pytest.raises(UsageError, match=r"run/checkpoint-000001\.dcp is a symbolic link"):
            save_run_checkpoint(model, optimizer, {"step": 1}, out, 1, keep_last=1)
    finally:
        dist.destroy_process_group()
    assert os.path.islink(link) and (tmp_path / "mine" / "thesis.tex").exists()
    assert not (out / "checkpoint-000001.dcp.old").exists() and not (out / "checkpoint-000001.dcp.tmp").exists()
