"""Flags and checks shared by the commands; argparse-only at import (building a parser imports no torch).

Everything here runs before any work: a bad flag or an output path that cannot be written
is reported in one line while nothing has been computed yet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from lomar.errors import UsageError

__all__ = ["MODEL_NAMES", "device_flag", "resolve_device", "int_range", "positive_float", "check_output_file",
           "check_output_dir", "write_json", "add_override_arguments", "overrides_from_args", "load_for_cli",
           "as_flags"]

# The names :func:`lomar.models.vit.list_models` returns, written out so that --help needs no torch
# (a test keeps the two equal).
MODEL_NAMES = tuple(f"vit_{size}_patch{patch}" for size in ("tiny", "small", "base", "large", "huge")
                    for patch in (8, 14, 16))

_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")
DEVICE_HELP = "auto (CUDA if available), cpu, cuda, cuda:N or mps"


def device_flag(text: str) -> str:
    """argparse type of every --device: the spelling only (availability is checked by resolve_device)."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use {DEVICE_HELP}")
    return text


def resolve_device(text: str | None) -> str:
    """A --device value (None = auto) -> a device string torch can use here; UsageError otherwise."""
    import torch

    text = text or "auto"
    device_flag(text)
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available on this machine; pass --device cpu")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"pass cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    if text == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine; pass --device cpu")
    return text


def int_range(low: int, high: int | None = None):
    """argparse type: an integer in [low, high] (high None = no upper bound)."""
    accepted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _finite_float(text: str, zero_ok: bool) -> float:
    accepted = "a finite number >= 0" if zero_ok else "a finite number > 0"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise argparse.ArgumentTypeError(f"expected {accepted}, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (rejects nan, inf, 0 and negatives)."""
    return _finite_float(text, zero_ok=False)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _finite_float(text, zero_ok=True)


def _check_writable_dir(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a temporary file in ``folder``: the only test a read-only mount or ACL answers."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".lomar-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"{flag} {target}: cannot write in {folder} ({reason}); choose a writable location") \
            from None


def _existing_ancestor(path: Path, flag: str, target: Path) -> Path:
    """The nearest existing folder above ``path`` (which a command may create); a file there is an error."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {target}: {parent} is a file, not a folder; choose another path")
            return parent
    return Path.cwd()


def check_output_file(path: str | Path | None, flag: str, overwrite: bool = True,
                      create_parents: bool = False) -> None:
    """Fail now if a result cannot be written to ``path`` later (None: nothing to check).

    The parent must exist (or, with ``create_parents``, its nearest existing ancestor) and
    accept a new file; ``path`` must not be a folder or a device, nor exist unless ``overwrite``.
    """
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {target} is a folder; give a file name such as {target / 'result'}")
    if target.exists() or target.is_symlink():
        if not target.is_file():
            raise UsageError(f"{flag} {target} is not a regular file (a device or special file); "
                             f"give a file path")
        if not overwrite:
            raise UsageError(f"{flag} {target} already exists; pass --overwrite to replace it")
    parent = target.parent
    if create_parents:
        parent = _existing_ancestor(parent, flag, target)
    elif not parent.exists():
        raise UsageError(f"{flag} {target}: folder {parent} does not exist; create it first")
    elif not parent.is_dir():
        raise UsageError(f"{flag} {target}: {parent} is a file, not a folder; choose another path")
    _check_writable_dir(parent, flag, target)


def check_output_dir(path: str | Path, flag: str) -> None:
    """Fail now if ``path`` cannot become (or is not) a writable folder; it may not exist yet."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {target} is a file, not a folder; pass a folder")
    _check_writable_dir(_existing_ancestor(target, flag, target), flag, target)


def write_json(path: str | Path, result: dict) -> Path:
    """Write ``result`` as indented JSON atomically: never half a file."""
    from lomar.checkpoints.io import atomic_write_text

    return atomic_write_text(path, json.dumps(result, indent=1) + "\n")


# ---- for original checkpoints ---------------------------------------------------------------
def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that fill in what an original checkpoint's weights cannot tell."""
    group = parser.add_argument_group("for original checkpoints (what the weights cannot tell)")
    group.add_argument("--num-heads", type=int_range(1), help="attention heads (needed for non-standard widths "
                                                              "without an RPE table; default: inferred)")
    group.add_argument("--img-size", type=int_range(1), help="pretraining image size (default: from the "
                                                             "checkpoint, else 224)")
    group.add_argument("--window-size", type=int_range(1), help="LoMaR window size K (default: 7)")
    group.add_argument("--windows", type=int_range(1), dest="num_windows",
                       help="LoMaR windows per image (default: 4)")
    group.add_argument("--decoder-num-heads", type=int_range(1),
                       help="MAE decoder heads (default: 16 for a 512-wide decoder)")


def overrides_from_args(args: argparse.Namespace) -> dict:
    names = ("num_heads", "img_size", "window_size", "num_windows", "decoder_num_heads")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def load_for_cli(path: str, args: argparse.Namespace):
    """:func:`lomar.checkpoints.convert.load_model` with the override flags; UsageError on bad input."""
    from lomar.checkpoints.convert import load_model

    try:
        return load_model(path, **overrides_from_args(args))
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise UsageError(as_flags(str(exc))) from None


def as_flags(message: str) -> str:
    """The library's "pass num_heads=... to load_original" becomes the command line's "pass --num-heads"."""
    return re.sub(r"pass (\w+)=\.\.\. to load_original", lambda m: f"pass --{m[1].replace('_', '-')}", message)


def report_run_failure(command: str, exc: Exception) -> int:
    """Print why a run stopped (``lomar COMMAND: error: ...``) and return exit code 1. A failed
    checkpoint save is raised on every torchrun rank; only rank 0 prints it."""
    from lomar.train.run_state import SaveError

    if not isinstance(exc, SaveError) or int(os.environ.get("RANK", "0")) == 0:
        sys.stderr.write(f"lomar {command}: error: {exc}\n")
    return 1
