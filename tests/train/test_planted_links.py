"""A run folder may come from elsewhere (a shared run, a tarball, a git checkout) holding links under the names a
run writes: lomar writes and reads its own files, never through a link to someone else's."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from lomar.checkpoints.io import atomic_write_bytes, open_in_place
from lomar.errors import UsageError
from lomar.train.monitor import Monitor
from lomar.train.run_state import RunLock, prepare_run_folder, truncate_metrics


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


def test_an_atomic_write_creates_its_temporary_itself_not_through_a_planted_link(tmp_path):
    target = tmp_path / "elsewhere" / "created.txt"  # a file the link's owner wants made, e.g. an autostart entry
    target.parent.mkdir()
    _plant(tmp_path / "run", f".last.pt.tmp-{os.getpid()}", target)
    atomic_write_bytes(tmp_path / "run" / "last.pt", b"weights")
    assert not target.exists() and not os.path.lexists(tmp_path / "run" / f".last.pt.tmp-{os.getpid()}")
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
