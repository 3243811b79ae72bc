"""Refuse to start an install that cannot fit on the disk, before pip writes anything.

`make install` puts PyTorch 2.14.1 in the virtual environment, and on x86_64 that is the CUDA
build: about 6 GiB once unpacked (elsewhere a CPU build, under 1 GiB). pip copes badly with a
full disk (an ``OSError: [Errno 28]`` halfway through, and a half-installed venv), so this
checks first, on the disk that holds the venv and on the one that holds pip's temporary files,
and says in one line what is short.
A venv that already has torch needs little more, so it is held to a smaller need.

Usage: ``python tools/check_disk.py VENV [--need-gib N] [--need-gib-with-torch N]``; exit 1 when short.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path


def existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (the disk it will live on)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def has_torch(venv: Path) -> bool:
    return any(venv.glob("lib/python*/site-packages/torch/__init__.py"))


def shortfall(venv: Path, need_gib: float) -> str | None:
    """The one-line complaint about the first place with less than ``need_gib`` free, or None."""
    places = {"the virtual environment": existing_ancestor(venv),
              "pip's temporary files": Path(tempfile.gettempdir())}
    for role, where in places.items():
        free_gib = shutil.disk_usage(where).free / 2**30
        if free_gib < need_gib:
            return (f"lomar install: only {free_gib:.1f} GiB free on {where} (for {role}); installing "
                    f"PyTorch 2.14.1 and lomar's dependencies needs about {need_gib:g} GiB there. Free some "
                    "space, or point VENV= (the venv) or TMPDIR (pip's temporary files) at a larger disk, and rerun.")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path)
    # x86_64 gets torch's CUDA build (~6 GiB unpacked); other machines a CPU build under 1 GiB.
    default_need = 7.0 if platform.machine().lower() in ("x86_64", "amd64") else 2.0
    parser.add_argument("--need-gib", type=float, default=default_need,
                        help="free space needed without torch installed")
    parser.add_argument("--need-gib-with-torch", type=float, default=0.5,
                        help="free space needed when the venv already has torch")
    args = parser.parse_args(argv)
    if os.environ.get("LOMAR_SKIP_DISK_CHECK") == "1":
        return 0
    need = args.need_gib_with_torch if has_torch(args.venv) else args.need_gib
    problem = shortfall(args.venv, need)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
