"""benchmarks/gpu_check.sh's path and its CPU-mode environment with a stand-in python (a bash script in place
of each part's command), for the gpu_check tests."""

import os
from pathlib import Path

from helpers import BENCHMARKS

SCRIPT = BENCHMARKS / "gpu_check.sh"


def _stand_in(tmp_path: Path, script: str, **settings: str) -> dict[str, str]:
    """The check's CPU-mode environment whose venv's python is ``script`` (bash), standing in for each part's command;
    ``settings`` are added (``OUT`` is ``tmp_path/gc`` unless given)."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/usr/bin/env bash\n" + script)
    python.chmod(0o755)
    return {**os.environ, "OUT": str(tmp_path / "gc"), "GPU_CHECK_WORK": str(tmp_path / "work"),
            "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_VENV": str(python.parents[1]), **settings}
