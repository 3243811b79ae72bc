"""``benchmarks/gpu_check.sh`` stopped from outside (SIGKILL at a device call's limit, an outer timeout's SIGTERM):
finished parts kept in the archive, the running part reached at once (where its own timeout drops the signal too)
and killed if it ignores it, and a subshell left going after its part returned."""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_check_stand_ins import SCRIPT, _stand_in


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_a_check_stopped_mid_part_leaves_every_finished_part_in_its_archive(stop, tmp_path):
    """A device call killed at its limit (SIGKILL: no trap runs, no last tar) or an outer `timeout` (SIGTERM to the
    script's process group): GPU_CHECK_ARCHIVE, kept current after every part and every few seconds, holds the
    finished part, the one cut short as far as it wrote, and the log; a SIGTERM stops the bench part at once."""
    import signal
    import tarfile
    import time

    archive = tmp_path / "gc.tgz"
    # a bench that writes its JSON; at 96 px it then hangs
    env = _stand_in(tmp_path, 'for a; do [ "$prev" = --json ] && json=$a; prev=$a; done\n'
                              'case " $* " in *" --sizes 96 "*) echo \'{"meta": {"complete": false}}\' > "$json"; '
                              f'echo $$ > {tmp_path}/hung; exec sleep 60;; esac\n'
                              'echo \'{"meta": {"complete": true}}\' > "$json"\n',
                    GPU_CHECK_PARTS="bench", GPU_CHECK_SIZES="64 96", GPU_CHECK_ARCHIVE=str(archive),
                    GPU_CHECK_ARCHIVE_EVERY="0.2")
    check = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)

    def names() -> set[str]:
        try:
            with tarfile.open(archive) as tar:
                return set(tar.getnames())
        except (OSError, tarfile.TarError):
            return set()

    try:
        deadline = time.monotonic() + 30
        while "gc/bench-96.json" not in names() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(check.pid, getattr(signal, stop))
        code = check.wait(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(check.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):  # the hung bench, if it outlived it
            os.kill(int((tmp_path / "hung").read_text()), signal.SIGKILL)
    assert code == (-9 if stop == "SIGKILL" else 143)
    assert {"gc/summary.log", "gc/bench-64.json", "gc/bench-96.json"} <= names()
    with tarfile.open(archive) as tar:
        log = tar.extractfile("gc/summary.log").read().decode()
        cut_short = json.loads(tar.extractfile("gc/bench-96.json").read())
    assert "part bench-64: ok (rc 0)" in log
    assert ("stopped by SIGTERM" in log) == (stop == "SIGTERM")
    assert cut_short["meta"]["complete"] is False
    assert not list(tmp_path.glob("gc.tgz.*.tmp"))


@pytest.mark.parametrize("case", ["pretrain", "stuck-tests", "stuck-tests-own-limit"])
def test_a_stop_reaches_the_running_part_at_once_and_kills_one_that_ignores_it(case, tmp_path):
    """An outer `timeout`'s SIGTERM reaches the running part although its own `timeout` gives it a process group of
    its own: a pretraining run saves and ends within a second, and the check ends after it, without starting
    another part. A part that ignores SIGTERM (stuck in C code) is killed GPU_CHECK_KILL_AFTER s later, whether
    the signal was the outer one or its own limit's."""
    import signal
    import time

    own_limit = case.endswith("own-limit")
    # a pretraining run that saves on SIGTERM; tests that ignore it
    env = _stand_in(tmp_path, 'case " $* " in\n'
                              f'  *" pretrain "*) trap \'echo saved > {tmp_path}/saved; exit 0\' TERM\n'
                              f'    echo $$ > {tmp_path}/running; while :; do sleep 0.05; done;;\n'
                              f'  *" -m pytest "*) trap \'\' TERM; echo $$ > {tmp_path}/running; exec sleep 30;;\n'
                              'esac\n',
                    GPU_CHECK_KILL_AFTER="1", GPU_CHECK_PARTS="pretrain tests" if case == "pretrain" else "tests bench",
                    GPU_CHECK_T_TESTS="0.5" if own_limit else "30", GPU_CHECK_SIZES="64")
    check = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    running = tmp_path / "running"
    try:
        deadline = time.monotonic() + 20
        while not running.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running.exists(), "the part did not start"
        signalled = time.monotonic()
        if not own_limit:
            os.killpg(check.pid, signal.SIGTERM)
        code = check.wait(timeout=10)
        took = time.monotonic() - signalled
        try:  # a zombie (killed, its parent gone, not yet reaped) has ended
            stat = Path(f"/proc/{running.read_text().strip()}/stat").read_text()
            part_alive = stat.rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            part_alive = False
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(check.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):  # the part's own group, if it outlived it
            os.killpg(os.getpgid(int(running.read_text())), signal.SIGKILL)
    log = (tmp_path / "gc" / "summary.log").read_text()
    if case == "pretrain":
        assert (tmp_path / "saved").exists() and took < 3, (took, log)
        assert code == 143 and "stopped by SIGTERM" in log and "part pretrain: ok (rc 0) stopped by the signal" in log
        assert "part tests" not in log
    else:
        assert 1 <= took < 4, (took, log)  # SIGKILL GPU_CHECK_KILL_AFTER s after the SIGTERM
        assert code == (0 if own_limit else 143), log
        assert ("part bench-64" in log) == own_limit, log  # the next part starts only after a part's own limit
        assert "part tests: killed (rc 137)" in log, log
    assert not part_alive


_TIMEOUT_THAT_DROPS_THE_STOP = """\
import os, signal, subprocess, sys
# coreutils' timeout as it leaves its command in a race (coreutils issue #82, seen with 9.1 under load): a group of
# its own, its command in it, and a SIGTERM that ends it without passing the signal on
os.setpgid(0, 0)
signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(143))
sys.exit(subprocess.call(sys.argv[4:]))
"""


@pytest.mark.slow  # the check's bash and a python process: ~1 s
def test_a_stop_reaches_the_part_where_its_timeout_drops_the_signal(tmp_path):
    """A SIGTERM that reaches coreutils' timeout just as it starts its command can end it without passing the signal
    on: the stop goes to the part's process group too, so the command, in that group, still gets it (here a
    pretraining run that saves on SIGTERM); the check ends, where it waited on the command to its own end."""
    import signal
    import time

    fake = tmp_path / "bin" / "timeout"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n" + _TIMEOUT_THAT_DROPS_THE_STOP)
    fake.chmod(0o755)
    env = _stand_in(tmp_path, 'case " $* " in\n'
                              f'  *" pretrain "*) trap \'echo saved > {tmp_path}/saved; exit 0\' TERM\n'
                              f'    echo $$ > {tmp_path}/running; while :; do sleep 0.05; done;;\n'
                              'esac\n',
                    GPU_CHECK_PARTS="pretrain", PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    check = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    running = tmp_path / "running"
    try:
        deadline = time.monotonic() + 20
        while not (running.exists() and running.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running.exists(), "the part did not start"
        os.killpg(check.pid, signal.SIGTERM)
        code = check.wait(timeout=10)  # the run stops with the check, which does not wait on it
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(check.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):  # the run, if it outlived the check
            os.kill(int(running.read_text()), signal.SIGKILL)
    log = (tmp_path / "gc" / "summary.log").read_text()
    assert code == 143 and (tmp_path / "saved").exists(), log
    assert "stopped by SIGTERM" in log, log


def test_a_stop_after_a_part_has_returned_leaves_its_subshell_going():
    """part's trap outlives the call in the subshell that ran it, where its local pid is gone: under the script's
    set -u a stop there must not end the subshell (reporting the finished part as failed)."""
    part = re.search(r"^part\(\) \{.*?^\}$", SCRIPT.read_text(), re.S | re.M)[0]
    code = f"set -u\n{part}\n( part 5 true; kill -TERM $BASHPID; echo going on )\n"
    result = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30)
    assert "going on" in result.stdout, result.stderr
