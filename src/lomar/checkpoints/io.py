"""Atomic writes and safe checkpoint loading: the one place that touches checkpoint files.

Every file lomar writes goes through :func:`atomic_write_bytes` / :func:`atomic_write_text` /
:func:`atomic_save`: written to a temporary name beside the target, fsynced, renamed over it.
A crash (or a full disk) at any moment leaves the old file or the new one, never a truncated
one and never the temporary. Checkpoints are read with ``weights_only=True`` and only
``argparse.Namespace`` allow-listed: never a plain unpickle (SPEC §6.5).

Reading a checkpoint *as a model* (format detection, key maps) lives in
:mod:`lomar.checkpoints.formats`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shutil
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, BinaryIO

import torch
from safetensors import safe_open

from lomar.checkpoints.own_names import own_temporary
from lomar.errors import ANSI_ESCAPE, UsageError

__all__ = ["check_finite", "first_non_finite", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_save",
           "safe_load", "describe_file", "starts_as_safetensors", "quiet_pickle_protocol",
           "write_error", "open_in_place", "read_in_place", "read_log", "log_record", "refuse_link", "remove_tree",
           "mismatch", "differences", "FILE_MODE"]

# Exports and checkpoints are meant to be shared: rw-r--r-- whatever mkstemp-like defaults say.
FILE_MODE = 0o644


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], mode: int = FILE_MODE) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync, chmod, rename over ``path``.

    The temporary is this writer's own (:func:`~lomar.checkpoints.own_names.own_temporary`): created afresh, never
    opened through a link of its name, never another writer's, on a shared folder (NFS) another machine's of the same
    pid included. On any failure the temporary is removed and ``path`` is untouched. A failed write surfaces as the
    OSError behind it, naming ``path`` (not the temporary), even where the writer wrapped it in its own error:
    ``torch.save`` on a full disk raises a RuntimeError from its zip writer.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp, fd = own_temporary(path)
        with open(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), mode)
        os.replace(tmp, path)
        tmp = None
    except Exception as exc:
        error = write_error(exc, path)
        if error is None:
            raise
        raise error from exc
    finally:
        if tmp is not None:  # made by this call, so no other writer's
            tmp.unlink(missing_ok=True)
    return path


def open_in_place(path: str | Path, mode: str = "r", **text) -> IO:
    """``open(path, mode)`` ("r", "a" or "a+"; with "b", binary) of a file in a folder lomar writes into but may not
    have made (a run folder from elsewhere): UsageError naming ``path`` when it is a symbolic link, which lomar neither
    writes nor reads through (through a ``.lock`` link the run's pid would replace the file it names), or not a
    regular file (a FIFO blocks, /dev/zero fills memory). ``text``: ``open``'s encoding or errors."""
    flags = {"r": os.O_RDONLY, "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT, "a+": os.O_RDWR | os.O_APPEND | os.O_CREAT}
    try:
        flag = flags[mode.replace("b", "")] | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(path, flag, FILE_MODE)
    except OSError as exc:
        if not (os.path.islink(path) or exc.errno in (errno.ELOOP, errno.ENXIO)):  # ENXIO: a FIFO, no reader
            raise
        fd = None
    if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
        return os.fdopen(fd, mode, **text)
    if fd is not None:
        os.close(fd)
    raise _not_in_place(path, "not a regular file (a pipe or device)")


def _not_in_place(path: str | Path, what: str) -> UsageError:
    """The refusal of ``path``, which is ``what`` (unless a symbolic link: then that, and where it points)."""
    if os.path.islink(path):
        what = f"a symbolic link (to {os.readlink(path)})"
    return UsageError(f"{path} is {what}, which lomar does not write or read through; remove it, or use another folder")


def read_in_place(path: str | Path, errors: str = "replace") -> str:
    """The text of ``path``, opened as :func:`open_in_place` opens it; ``errors``: ``open``'s."""
    with open_in_place(path, errors=errors) as handle:
        return handle.read()


def read_log(path: str | Path, stepless: bool = False) -> Iterator[tuple[str, dict]]:
    """(line, record) for each line of a run's JSON-lines log (``metrics.jsonl``, ``knn.jsonl``) that holds a JSON
    object with an integer ``step``, the line without its end; opened as :func:`open_in_place` opens it. A line at a
    time: a single-GPU ImageNet run logs 8 million steps. Any other line is skipped: a killed run can leave its last
    line torn, even mid-character; the resume (lomar.train.run_state), the loss curve (lomar.viz.curves) and the
    study's readers (lomar.train.monitor) all read the log through this one parser. ``stepless``: objects with no
    ``step`` key too, for the resume to keep (detect --eval-only appends its scores without one)."""
    with open_in_place(path, encoding="utf-8", errors="replace") as handle:
        for text in handle:
            line = text.rstrip("\n")
            if (record := log_record(line, stepless)) is not None:
                yield line, record


def log_record(line: str, stepless: bool = False) -> dict | None:
    """The record of one line of a run's log as :func:`read_log` reads it (``stepless`` too), None for a line that
    holds none."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step", 0 if stepless else None), int) \
        else None


def refuse_link(path: str | Path) -> None:
    """UsageError naming ``path`` when it is a symbolic link: in a folder lomar writes into but may not have made (a
    run folder from elsewhere) it neither writes nor reads through one, nor removes what one points to."""
    if os.path.islink(path):
        raise _not_in_place(path, "")


def remove_tree(path: str | Path, ignore_errors: bool = False) -> None:
    """``shutil.rmtree(path, ignore_errors)`` of one of lomar's folders in a run folder: :func:`refuse_link` first,
    as rmtree refuses a link with a traceback (with ``ignore_errors``, silently: it stays, taken for a checkpoint)."""
    refuse_link(path)
    shutil.rmtree(path, ignore_errors=ignore_errors)


def write_error(exc: BaseException, path: str | Path) -> OSError | None:
    """The OSError to report for a failed write of ``path``: the first one with an errno in
    ``exc``'s chain of causes and (unsuppressed) contexts, re-made to name ``path``; None if none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return OSError(exc.errno, exc.strerror or str(exc), str(path))
        seen.add(id(exc))
        exc = exc.__cause__ if exc.__cause__ is not None else None if exc.__suppress_context__ else exc.__context__
    return None


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = FILE_MODE) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data), mode)


def atomic_write_text(path: str | Path, text: str, mode: int = FILE_MODE) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


# torch.save's format before PyTorch 1.6 (DALL-E's encoder.pkl among others) opens with its pickled magic number
_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def starts_as_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes (9 or more) are a safetensors file's: an 8-byte little-endian header length
    within the reader's own 100 MB cap (a text's first 8 bytes read as one are far more), then the JSON header's
    '{'. A file cut short, in its header too, still starts so: its reader then names it damaged."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000


def describe_file(path: str | Path) -> str:
    """What a file that is not a PyTorch checkpoint looks like, for an error message ("a text file", ...)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_LEGACY_HEAD))
    except OSError:
        return "an unreadable file"
    if not head:
        return "an empty file"
    if len(head) >= 4 and head == _LEGACY_HEAD[:len(head)]:  # told a plain pickle, a user might unpickle it
        return ("a torch.save checkpoint in the legacy format (before PyTorch 1.6) that is cut short or damaged "
                "(download or save it again)")
    if head.startswith(b"PK"):
        return "a zip archive that is not a complete PyTorch checkpoint"
    if starts_as_safetensors(head):
        return _safetensors_kind(Path(path))
    if head[:1] in (b"{", b"[") or head.isascii() and all(32 <= b < 127 or b in b"\r\n\t" for b in head):
        return "a text file"
    if head[:1] == b"\x80":
        return "a Python pickle, not a checkpoint written by torch.save"
    return "a file in an unknown format"


def _safetensors_kind(path: Path) -> str:
    """A file that torch.load refused although it opens as safetensors: whole or damaged, as the safetensors reader
    tells by its header (bounded before it is read) and the data it must cover. torch.load reads a whole one only
    under a name ending in .safetensors, and an older PyTorch none at all."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception:  # safetensors' own error type is not a ValueError
        return "a safetensors file that is cut short or damaged (copy or export it again)"
    if not path.name.endswith(".safetensors"):  # torch.load's own test, case included
        return f"a whole safetensors file, which torch.load reads only under a name ending in .safetensors; " \
               f"rename it to {path.stem}.safetensors"
    return f"a whole safetensors file, which torch.load of PyTorch {torch.__version__} does not read"


@contextlib.contextmanager
def quiet_pickle_protocol():
    """torch warns of a plain pickle's protocol before it reads or refuses it; what follows says it all."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


def safe_load(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """``torch.load`` with ``weights_only=True``; argparse.Namespace is the one allowed class.

    ``mmap=True`` maps the tensors instead of reading them: cheap when only the small entries
    (config, step) are wanted. Raises FileNotFoundError or ValueError with a one-line message.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, not a checkpoint file: pass its file (a run's last.pt); "
                         f"an export folder loads with lomar.create_encoder")
    if path.exists() and not path.is_file():  # a FIFO would block the read; a device is no checkpoint either
        raise ValueError(f"checkpoint {path} is not a regular file (a device, pipe or socket); pass a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), quiet_pickle_protocol():
            data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # corrupt, truncated, not a checkpoint, or holds disallowed objects
        text = ANSI_ESCAPE.sub("", str(exc)).strip()
        if "Unsupported global" in text or "GLOBAL" in text:  # not any weights-only failure: garbage fails too
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" ({found[1]})" if found else ""
            raise ValueError(f"cannot read checkpoint {path}: it holds Python objects{what} that a weights-only "
                             f"load refuses (lomar never unpickles arbitrary code); re-save it as a plain state "
                             f"dict") from exc
        found = describe_file(path)
        expected = "" if "torch.save" in found or "safetensors" in found else \
            ", expected a PyTorch checkpoint written by torch.save (.pt / .pth)"
        raise ValueError(f"cannot read checkpoint {path}: it is {found}{expected}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict")
    return data


def mismatch(exc: Exception) -> str:
    """What a failed ``load_state_dict`` says differs, in one line: torch's first line is only a header
    ("Error(s) in loading state_dict for …:"), the first difference follows it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]


def differences(exc: Exception) -> str:
    """All that a failed ``load_state_dict`` says differs, on one line: its lines after torch's header."""
    return " ".join(line.strip() for line in str(exc).splitlines()[1:])


def first_non_finite(weights: dict) -> str | None:
    """The name of the first floating-point tensor of ``weights`` (a state dict) that holds NaN or inf, None when
    none does (entries that are no tensors are passed over); one host read."""
    named = [(name, value) for name, value in weights.items() if torch.is_tensor(value) and value.is_floating_point()]
    device = named[0][1].device if named else None  # a state dict may hold tensors on two devices
    finite = torch.stack([torch.isfinite(value).all().to(device) for _, value in named]).tolist() if named else []
    return next((name for (name, _), ok in zip(named, finite) if not ok), None)


def check_finite(model: torch.nn.Module, path: str | Path) -> None:
    """ValueError naming the first weight with NaN or inf: a run that diverged, or a damaged file, would
    otherwise give silently wrong results."""
    if (bad := first_non_finite(model.state_dict())) is not None:
        raise ValueError(f"{path}: {bad} holds NaN or infinite values; pass weights saved before the run diverged")
