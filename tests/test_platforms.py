"""Windows, simulated on Linux: no fcntl (nor the other POSIX-only modules), no SIGUSR1, no fork. lomar is not
supported there (README: Platforms), but it must import, answer --help, and refuse or lock in words, not tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WINDOWS_LIKE = '''
import os, signal, sys

class _NoPosixModules:
    def find_spec(self, name, path=None, target=None):
        if name in {"fcntl", "resource", "termios", "pwd", "grp"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

for _name in ("fcntl", "resource", "termios", "pwd", "grp"):
    sys.modules.pop(_name, None)
sys.meta_path.insert(0, _NoPosixModules())
import torch  # first: its own Windows branch (no os.register_at_fork) is torch's to keep, not ours
for _name in ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGKILL", "SIGALRM", "SIGQUIT", "SIGCHLD", "SIGPIPE"):
    delattr(signal, _name)
for _name in ("fork", "register_at_fork", "getuid", "getloadavg", "sched_getaffinity", "O_NOFOLLOW", "killpg"):
    delattr(os, _name)
'''

CHECKS = '''
import sys
from pathlib import Path
from lomar.cli.app import main
assert main(["--help"]) == 0 and main(["pretrain", "--help"]) == 0
# a command's start sets its signal handlers
assert main(["knn", str(Path(sys.argv[1]) / "missing.pt"), "--data", sys.argv[1]]) == 2
from lomar.checkpoints.export_write import write_export
import lomar.cli.study.spec  # its stop signals, read at import (lomar study itself needs POSIX signals)
from lomar.train.run_lock import RunLock
with RunLock(Path(sys.argv[1]) / "run") as lock:
    assert lock.handle is None
'''


@pytest.mark.slow  # a subprocess
def test_lomar_imports_helps_and_runs_unlocked_where_the_system_is_windows_like(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(WINDOWS_LIKE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", CHECKS, str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "UserWarning" not in line and "filelock" not in line]
    assert lines == [f"lomar knn: error: checkpoint {tmp_path / 'missing.pt'} does not exist; check the path",
                     f"--out {tmp_path / 'run'}: no file lock there (this system has no flock); the folder is not "
                     f"locked against a second run: start no other run into it meanwhile"], result.stderr[-2000:]
