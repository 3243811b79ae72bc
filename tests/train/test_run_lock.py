"""The run folder's lock (lomar.train.run_lock): a second run refused at once and told who holds it, a filesystem
without flock, a removed working folder, and the lock freed when its holder dies."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import no_flock
from lomar.errors import UsageError
from lomar.train.run_lock import RunLock
from lomar.train.run_state import refuse_held_run
from lomar.train.settings import ConfigError


def test_a_second_lock_on_the_folder_refuses_at_once(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(UsageError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            RunLock(out).acquire()
    with RunLock(out):  # released on exit
        pass


def test_a_refusal_names_the_holder_and_its_machine_where_it_is_another(tmp_path):
    """The lock file says "pid N on HOST": a run on another machine sharing the folder is named with its host (its
    PID means nothing here); a bare PID, as a lock file of an older lomar holds, reads as before."""
    out = tmp_path / "run"
    out.mkdir()
    for text, owner in (("pid 4242 on elsewhere", "pid 4242 on elsewhere"), ("4242", "pid 4242"), ("", "pid unknown")):
        (out / ".lock").write_text(text)
        with open(out / ".lock") as holder:
            fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: another holder, as far as flock goes
            with pytest.raises(UsageError, match=rf"in use by another run \({owner}\); wait for it"):
                RunLock(out).acquire()
    (out / ".lock").write_text("pid 7 on a\n" + "x" * 100_000)  # planted: its rest must not reach the message
    with open(out / ".lock") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(UsageError) as caught:
            RunLock(out).acquire()
    assert "\n" not in str(caught.value) and f"(pid 7 on a {'x' * 69}); wait for it" in str(caught.value)


def test_a_run_on_a_filesystem_without_flock_starts_unlocked_with_one_warning(tmp_path, monkeypatch, caplog):
    """Lustre mounted -o noflock (ENOSYS), some NFS setups (ENOLCK): such an OSError of flock is no other run's hold,
    so the run is not refused as "in use by another run (pid unknown)". It starts, saying once that the folder is
    not locked; the check for a run already there and the run's export into its folder do not say it again, and a
    failed set-up leaves no folder."""
    from lomar.checkpoints.export_leftovers import export_lock

    no_flock(monkeypatch, errno.ENOSYS)
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        with RunLock(out):  # no UsageError 'in use by another run'
            (out / "last.pt").write_bytes(b"x")
            with pytest.raises(ConfigError, match="already holds a run"):
                refuse_held_run(out, None, False)
            with export_lock(out) as locked:
                assert not locked
        assert caplog.messages == [f"--out {out}: no file lock there (Function not implemented); the folder is not "
                                   f"locked against a second run: start no other run into it meanwhile"]
        with pytest.raises(RuntimeError), RunLock(tmp_path / "new"):
            raise RuntimeError("set-up failed")
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"] and not (tmp_path / "new").exists()


def test_a_run_without_flock_leaves_the_lock_file_of_a_run_on_a_machine_with_it(tmp_path, monkeypatch):
    """An NFS folder, one client mounted with flock and this one without: the lock file there may be a live run's.
    Removing it (as one the run made is) would let a third run on the other client lock a new file beside it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("pid 4242 on elsewhere")

    no_flock(monkeypatch)
    with RunLock(out):
        assert (out / ".lock").read_text() == "pid 4242 on elsewhere"  # kept
    assert (out / ".lock").read_text() == "pid 4242 on elsewhere"


def test_a_run_into_a_removed_working_folder_is_refused_not_stuck(tmp_path, monkeypatch):
    """--out run, relative, from a working folder removed meanwhile: making the folder fails with ENOENT each time,
    which the lock retried forever at full CPU."""

    def stuck(*_):
        pytest.fail("still trying to lock the folder after 2 s")

    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    before = signal.signal(signal.SIGALRM, stuck)
    try:
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        with pytest.raises(UsageError, match=r"^--out run: No such file or directory; pass a folder you can write"):
            RunLock(Path("run")).acquire()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


@pytest.mark.slow
def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    out = tmp_path / "run"
    code = (f"from lomar.train.run_lock import RunLock; lock = RunLock({str(out)!r}).acquire(); "
            f"import os; os._exit(3)")  # a crash: no clean-up code runs
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ}, timeout=120)
    assert proc.returncode == 3 and (out / ".lock").exists()
    with RunLock(out):
        pass


def test_a_failed_set_up_leaves_no_empty_folder(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with RunLock(out):
            raise RuntimeError("set-up failed")
    assert not out.exists()
    existing = tmp_path / "old"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with RunLock(existing):
            raise RuntimeError("set-up failed")
    assert existing.is_dir()  # not ours to remove


@pytest.mark.slow
def test_a_killed_run_frees_its_folder_at_once_though_its_forked_workers_live_on(tmp_path):
    out = tmp_path / "run"
    code = (f"import multiprocessing as mp, time, sys; from lomar.train.run_lock import RunLock; "
            f"lock = RunLock({str(out)!r}).acquire(); worker = mp.get_context('fork').Process(target=time.sleep, "
            f"args=(60,)); worker.start(); print(worker.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    try:
        proc.kill()  # as kill -9: the loader worker outlives the run by seconds
        proc.wait(timeout=30)
        with RunLock(out):
            pass
    finally:
        os.kill(worker, 9)
        proc.stdout.close()  # else the collector closes it: a ResourceWarning (unclosed file) under -W error


def test_a_users_own_file_of_the_locks_name_is_refused_and_left_as_it_is(tmp_path):
    """A folder lomar writes into but may share (predict's --out, --eval-only's) may hold a file of the user's named
    .lock: the lock refuses it in one line rather than writing its holder's name over it (or an unlock removing it);
    what lomar's lock files hold (nothing, "pid N on HOST", an older lomar's bare PID) is taken."""
    from lomar.checkpoints.file_lock import holding_file_lock

    out = tmp_path / "out"
    out.mkdir()
    for text, shown in (("my notes\nabout locks", "'my notes about locks'"), ("pid 7 on " + "x" * 400, "'pid 7 on x")):
        (out / ".lock").write_text(text)
        with pytest.raises(UsageError) as caught:
            RunLock(out).acquire()
        assert (out / ".lock").read_text() == text
        assert "\n" not in str(caught.value) and len(str(caught.value).replace(str(out), "DIR")) < 200
        assert str(caught.value).startswith(f"{out / '.lock'} is not a lomar lock file (it holds {shown}")
        assert str(caught.value).endswith("; move it elsewhere, or use another folder")
        with pytest.raises(UsageError, match="is not a lomar lock file"), holding_file_lock(out / ".lock", 0, OSError):
            pass
        assert (out / ".lock").read_text() == text  # not removed by the unlock
    for text in ("", "pid 4242 on elsewhere", "4242\n"):
        (out / ".lock").write_text(text)
        with RunLock(out):
            assert (out / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}"


def test_another_users_lock_file_is_refused_naming_it(tmp_path, monkeypatch):
    """Another user's lock file (0644: opened read-only, so a run cannot name itself in it; 0600: not opened at all)
    is refused naming that file, not as a folder the user cannot write to."""
    from lomar.checkpoints import file_lock

    opened = file_lock.open_in_place
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("pid 1 on elsewhere")
    for readable in (True, False):
        def theirs(path, mode="r", readable=readable, **text):  # the tests may run as root, whom no mode stops
            if "a" in mode or not readable:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return opened(path, mode, **text)

        monkeypatch.setattr(file_lock, "open_in_place", theirs)
        with pytest.raises(UsageError) as caught:
            RunLock(out).acquire()
        assert str(caught.value) == (f"--out {out}: {out / '.lock'} is another user's lock file, which this run cannot "
                                     f"write its name in (Permission denied); have it removed, or pass another --out")
    assert (out / ".lock").read_text() == "pid 1 on elsewhere"
