"""The test sets ``benchmarks/gpu_check.sh`` makes, each in a process of its own: one that fails or hangs (stopped at
its own limit) leaves the others made, and a stop while one is made leaves no set running."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_check_stand_ins import SCRIPT, _stand_in


def _stub_testset(tmp_path: Path, source: str) -> Path:
    """A package lomar.bench whose testset module is ``source``, under the folder returned (for PYTHONPATH)."""
    stub = tmp_path / "stub" / "lomar" / "bench"
    stub.mkdir(parents=True)
    for package in (stub.parent, stub):
        (package / "__init__.py").write_text("")
    (stub / "testset.py").write_text(source)
    return tmp_path / "stub"


def _sets_on(stub: Path) -> str:
    """A stand-in python (see _stand_in) that makes each test set with ``stub``'s make_test_set, in this interpreter;
    every other command succeeds."""
    return f'case $2 in *make_test_set*) PYTHONPATH={stub}:$PYTHONPATH exec {sys.executable} "$@";; esac\nexit 0\n'


def _ended(pid: int, within: float) -> bool:
    """Whether process ``pid`` ends within ``within`` seconds: gone, or a zombie (killed, not yet reaped)."""
    import time

    deadline = time.monotonic() + within
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def test_a_test_set_that_cannot_be_made_leaves_the_others_made(tmp_path):
    """Each test set is made by a process of its own: one that fails (here the camera set) is said in the log and
    the next ones are still made."""
    stub = _stub_testset(tmp_path, "from pathlib import Path\n"  # a lomar.bench.testset whose camera set fails
                                   "def make_test_set(out, kind, count):\n"
                                   "    if Path(out).name == 'camera':\n"
                                   "        raise OSError('no room for the camera set')\n"
                                   "    Path(out).mkdir(parents=True)\n"
                                   "    (Path(out) / f'{kind}-{count}').touch()\n")
    env = _stand_in(tmp_path, _sets_on(stub), GPU_CHECK_PARTS="loader finetune")
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    log = (tmp_path / "gc" / "summary.log").read_text()
    assert done.returncode == 0, done.stderr
    assert "OSError: no room for the camera set" in log and "camera test set: 0 JPEGs" in log, log
    ft = tmp_path / "work" / "ft"
    assert sorted(p.relative_to(ft).as_posix() for p in ft.rglob("imagenet-*")) == [
        "train/a/imagenet-8", "train/b/imagenet-8", "val/a/imagenet-4", "val/b/imagenet-4"], log


@pytest.mark.slow  # the check's bash and a python process: ~2 s
def test_a_test_set_that_hangs_is_stopped_at_its_own_limit_and_the_others_are_made(tmp_path):
    """Each set has a limit of its own (GPU_CHECK_T_SET): one that hangs (here the camera set, and a writer process of
    its own) is stopped at it with its writer, and the next sets are made (one limit for all the sets would let a hung
    one take the whole of it, and the sets after it would never be made)."""
    import signal

    writer = tmp_path / "writer"
    stub = _stub_testset(tmp_path, "import subprocess, sys, time\n"  # a lomar.bench.testset whose camera set hangs
                                   "from pathlib import Path\n"
                                   "def make_test_set(out, kind, count):\n"
                                   "    if Path(out).name == 'camera':\n"
                                   "        child = subprocess.Popen([sys.executable, '-c', 'import time; "
                                   "time.sleep(120)'])\n"
                                   f"        Path({str(writer)!r}).write_text(str(child.pid))\n"
                                   "        time.sleep(120)\n"
                                   "    Path(out).mkdir(parents=True)\n"
                                   "    (Path(out) / f'{kind}-{count}').touch()\n")
    env = _stand_in(tmp_path, _sets_on(stub), GPU_CHECK_PARTS="loader finetune", GPU_CHECK_T_SET="1")
    check = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        code = check.wait(timeout=60)  # the camera set's default limit: 120 s
        writer_ended = _ended(int(writer.read_text()), within=10)  # looked at before the clean-up below kills it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(check.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):  # the set's group, if it outlived it
            os.killpg(os.getpgid(int(writer.read_text())), signal.SIGKILL)
    log = (tmp_path / "gc" / "summary.log").read_text()
    assert code == 0, log
    assert f"test set {tmp_path / 'work' / 'camera'}: not made within 1 s (GPU_CHECK_T_SET); stopped" in log, log
    ft = tmp_path / "work" / "ft"
    assert sorted(p.relative_to(ft).as_posix() for p in ft.rglob("imagenet-*")) == [
        "train/a/imagenet-8", "train/b/imagenet-8", "val/a/imagenet-4", "val/b/imagenet-4"], log
    assert writer_ended  # the set's writer was stopped with it


@pytest.mark.parametrize("ignores", [False, True], ids=["stops", "ignores-term"])
def test_a_stop_while_a_test_set_is_made_exits_143_leaving_no_set_running(ignores, tmp_path):
    """An outer stop (SIGTERM to the check's process group) while a set is made: the set's process and its writer,
    in the process group of the set's own `timeout`, stop with it; the check exits 143, without a traceback, and
    makes no further set. A set that ignores the stop is killed GPU_CHECK_KILL_AFTER s later, and the log does not
    blame its own limit for it."""
    import signal
    import time

    pids = tmp_path / "pids"
    stub = _stub_testset(tmp_path, "import os, signal, subprocess, sys, time\n"  # a set that hangs, with a writer
                                   "from pathlib import Path\n"
                                   "def make_test_set(out, kind, count):\n"
                                   f"    {'signal.signal(signal.SIGTERM, signal.SIG_IGN)' if ignores else 'pass'}\n"
                                   "    child = subprocess.Popen([sys.executable, '-c', 'import time; "
                                   "time.sleep(60)'])\n"
                                   f"    Path({str(pids)!r} + '.tmp').write_text(f'{{os.getpid()}} {{child.pid}}')\n"
                                   f"    os.replace({str(pids)!r} + '.tmp', {str(pids)!r})\n"
                                   "    time.sleep(60)\n")
    env = _stand_in(tmp_path, _sets_on(stub), GPU_CHECK_PARTS="loader finetune", GPU_CHECK_KILL_AFTER="1")
    check = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not pids.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pids.exists(), "the set was not started"
        os.killpg(check.pid, signal.SIGTERM)
        code = check.wait(timeout=20)
        alive = [pid for pid in map(int, pids.read_text().split()) if not _ended(pid, within=10)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(check.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):  # the set's group, if it outlived it
            os.killpg(os.getpgid(int(pids.read_text().split()[0])), signal.SIGKILL)
    log = (tmp_path / "gc" / "summary.log").read_text()
    assert code == 143 and "Traceback" not in log, log
    assert not alive  # the set and its writer
    assert "stopped by SIGTERM" in log and not (tmp_path / "work" / "ft").exists(), log  # the next sets: not begun
    assert "not made within" not in log, log
