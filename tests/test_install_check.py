"""`tools/check_disk.py`, which `make install` runs before pip: a short disk is one line, not a half-built venv."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "check_disk.py"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env)


def test_a_disk_with_room_passes_silently(tmp_path: Path) -> None:
    result = run(str(tmp_path / "not" / "yet" / "venv"), "--need-gib", "0")
    assert result.returncode == 0 and result.stderr == ""


def test_a_short_disk_is_refused_in_one_line_naming_the_place_and_the_fix(tmp_path: Path) -> None:
    result = run(str(tmp_path / "venv"), "--need-gib", "1e9")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "GiB free on" in lines[0] and "1e+09 GiB" in lines[0] and "TMPDIR" in lines[0]


def test_a_venv_that_already_has_torch_is_held_to_the_smaller_need(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    torch_dir = venv / "lib" / "python3.11" / "site-packages" / "torch"
    torch_dir.mkdir(parents=True)
    (torch_dir / "__init__.py").write_text("")
    assert run(str(venv), "--need-gib", "1e9", "--need-gib-with-torch", "0").returncode == 0
    assert run(str(venv), "--need-gib", "0", "--need-gib-with-torch", "1e9").returncode == 1


def test_the_escape_hatch_skips_the_check(tmp_path: Path) -> None:
    env = {**os.environ, "LOMAR_SKIP_DISK_CHECK": "1"}
    assert run(str(tmp_path / "venv"), "--need-gib", "1e9", env=env).returncode == 0
