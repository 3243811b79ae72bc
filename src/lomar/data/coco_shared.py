"""A COCO split read once per machine under torchrun: the first process packs it into a cache file, the others
memory-map that file instead of each parsing the JSON.

``json.loads`` of COCO's train2017 file holds about 5 GB of Python objects while it is checked and packed, and every
process of a machine did it at the same moment (a synthetic 30k-image file: 0.77 GiB over each process's 0.67 GiB of
imports). Here the first process of the machine (:func:`lomar.errors.first_on_machine`) reads and packs the split in a
forked child, whose memory is returned when it ends, and writes the packed records
(:class:`~lomar.data.records.PackedRecords`), the image ids, the categories and the summary to one file; every process
then maps that file read-only, so the machine holds the records once, in the page cache, and loader workers forked
later share those pages too. A single process, or one process per machine, writes nothing: its child sends the packed
records back through a pipe (108 MB for 30k images, a fraction of a second beside the parse).

The file lives in the user's cache folder (:func:`lomar.data.user_cache.cache_folder`: ``~/.cache/lomar/coco`` unless
``$LOMAR_CACHE_DIR`` or ``$XDG_CACHE_HOME`` says otherwise): the annotation folder may be read-only and is not ours, and
the run folder is created by the main process alone, maybe on another machine. It is kept, so a resumed or later run on
the same file maps it at once (train2017's is about 0.4 GB; delete the folder to reclaim it). It is named by the
annotation file's and image folder's resolved paths and the split, then by what decides its content: their identity
(size, mtime_ns), the pixel limit and a digest of the code that packs it, which its header records too (a file that does
not match is never used), with the mtime_ns of each folder the split's images are in, known once it is parsed (a writer
that finds an image gone after that stat, or the identity moved, refuses to write). So two jobs on the same files with
another lomar or ``LOMAR_MAX_IMAGE_PIXELS`` each keep a file of their own (under one name they would overwrite each
other's: one would fail "cannot be read back", the other's processes wait out ``WAIT_S``). A first process removes the
files of its paths and split of another identity unused for ``WAIT_S`` (using one touches it): every process of the job
that wrote or used it has mapped it by then, and a mapped file that is unlinked stays readable; another job's writer
renames its file into place fresh.

The records are pickled (they are what :class:`PackedRecords` holds in memory; JSON took 10x pickle's time to write,
about 200 us a record, and 4x to read). Unpickling runs whatever a crafted file says, so a cache file is read only from
a folder of this user's (owned by us, writable by no one else, not a link; made with mode 0700) and only if it is a
regular file of ours that no one else may write (written with mode 0600: a group-writable one, as umask 002 makes, in
a folder others may enter, could be rewritten by them): anyone who can write there can already run code as us. The
file is one uint8 ``.npy`` (read with ``allow_pickle=False``): two int64 lengths, the JSON header, the int64 offsets
and the record bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import stat
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lomar.checkpoints.own_names import own_temporary
from lomar.data.coco import CocoSplit, CocoSummary
from lomar.data.decode import max_image_pixels
from lomar.data.records import IntTable, PackedRecords, pack_images
from lomar.data.user_cache import cache_folder, code_digest, ours_alone
from lomar.errors import FULL_DISK, UsageError, first_on_machine

__all__ = ["shared_split", "WAIT_S"]

WAIT_S = 1800.0  # how long a process waits for its machine's first one to write the file (30k images: 30 s)
_POLL_S = 0.2
_STALE_S = 3600.0  # a temporary untouched this long is a killed writer's
_FORMAT = 1
# the modules whose code decides what is packed
_PACKING_MODULES = ("lomar.data.coco", "lomar.data.coco_values", "lomar.data.polygons", "lomar.data.records", __name__)


def _shared() -> bool:
    """Whether other processes of this machine read the same split: torchrun's LOCAL_WORLD_SIZE above 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) > 1


def _our_folder() -> Path | None:
    """The cache folder, made if missing (mode 0700); None where it cannot be ours: none (no home folder), not
    writable, or a link or another user's folder (whose pickles we would run)."""
    try:
        folder = cache_folder("coco")
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022 \
            or not os.access(folder, os.W_OK | os.X_OK):
        return None
    return folder


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]


def _identity(ann_file: Path, image_root: Path, split: str) -> tuple[str, dict]:
    """(the cache file's name: its paths' and split's part, then its identity's; what its header must hold)."""
    ann, root = Path(ann_file).resolve(), Path(image_root).resolve()
    a, r = os.stat(ann), os.stat(root)
    identity = {"format": _FORMAT, "ann": str(ann), "size": a.st_size, "mtime_ns": a.st_mtime_ns, "root": str(root),
                "root_mtime_ns": r.st_mtime_ns, "split": split, "max_pixels": max_image_pixels(),
                "code": code_digest(*_PACKING_MODULES)}
    return f"{_digest([str(ann), str(root), split])}-{_digest(identity)}.npy", identity


def _prune(path: Path) -> None:
    """Mark ``path`` used now, and remove the files of its paths and split of another identity (or named by paths and
    split alone, as before) that no job used for ``WAIT_S``, and their writers' temporaries left ``_STALE_S``."""
    with contextlib.suppress(OSError):
        os.utime(path)
    key, now = path.name.split("-")[0], time.time()
    for other in (*path.parent.glob(f"{key}*.npy"), *path.parent.glob(f".{key}*.npy.tmp-*")):
        with contextlib.suppress(OSError):
            if other != path and now - other.lstat().st_mtime > (_STALE_S if other.name[0] == "." else WAIT_S):
                other.unlink()


def _header(split: CocoSplit, packed: tuple[PackedRecords, IntTable], identity: dict, folders: dict) -> bytes:
    """What the split is besides its records, as JSON: ids kept exact, whatever their size; and ``folders``."""
    return json.dumps({"identity": identity, "ids": list(packed[1]), "categories": split.categories,
                       "category_entries": [{"id": c["id"], "name": c["name"]} for c in split.data["categories"]],
                       "summary": vars(split.summary), "folders": folders}).encode()


def _settled_folders(split: CocoSplit, identity: dict) -> dict:
    """The mtime_ns of each folder the split's images are in (file_names such as Objects365's "patch0/x.jpg"):
    deleting or adding an image there changes that folder's time alone, not the image folder's of the identity.
    Those folders are known only once the file is parsed, so they are stat'd after it, and a UsageError is raised
    unless the split is still what was read: each of its images still there after its folder's stat (one deleted
    between the parse and that stat would leave a file keyed as fresh holding it), and the identity (stat'd before the
    parse) unchanged."""
    names: dict[str, list[str]] = {}
    for image in split.data["images"]:
        folder, name = os.path.split(str(image["file_name"]))
        names.setdefault(folder, []).append(name)
    times = {folder: _mtime_ns(identity["root"], folder) for folder in sorted(names)}
    # one listing a folder, not a stat an image: 30k images in 0.16 s, not 1.2 s. A name it lacks is stat'd as
    # read_coco checked it: a case-insensitive file system lists "a.jpg" for a file_name "A.JPG", and a folder may
    # be entered but not listed (mode 711)
    listed = {folder: _listing(os.path.join(identity["root"], folder)) for folder in times}
    if gone := next((os.path.join(f, n) for f, group in names.items() for n in group
                     if n not in listed[f] and not os.path.isfile(os.path.join(identity["root"], f, n))), None):
        moved = f"{gone} was deleted"
    elif _identity(identity["ann"], identity["root"], identity["split"])[1] != identity:
        moved = "its size or mtime moved"
    else:
        return times
    raise UsageError(f"{identity['ann']} or its images under {identity['root']} changed while it was read ({moved}); "
                     f"run again once they are settled")


def _listing(folder: str) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:  # each image is stat'd instead
        return set()


def _mtime_ns(root: str, folder: str) -> int:
    return os.stat(os.path.join(root, folder)).st_mtime_ns


def _write(path: Path, split: CocoSplit, packed: tuple[PackedRecords, IntTable], identity: dict) -> None:
    """``path`` written atomically: a temporary beside it (this writer's own), renamed over it."""
    header = _header(split, packed, identity, _settled_folders(split, identity))
    offsets, buffer = packed[0].arrays()
    header += b" " * (-len(header) % 8)  # the offsets start 8-aligned, so they map as int64
    total = 16 + len(header) + offsets.nbytes + buffer.nbytes
    tmp = None
    try:
        # this writer's own (pid and a random part): a folder shared by machines (a home on NFS) may see the same pid
        # on two of them (each in its own container), and the other's live temporary is neither removed nor renamed
        # in place of ours
        tmp, fd = own_temporary(path)
        with os.fdopen(fd, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": (total,)})
            handle.write(np.array([len(header), len(offsets)], dtype="<i8").tobytes())
            for part in (header, offsets.astype("<i8", copy=False), buffer):
                handle.write(memoryview(part).cast("B") if isinstance(part, np.ndarray) else part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:  # made by this call: no other writer's
            tmp.unlink(missing_ok=True)
        fix = "free space there" if exc.errno in FULL_DISK else "make it writable"
        raise UsageError(f"cannot write the packed annotations {path} ({exc.strerror}); {fix}, or set "
                         f"LOMAR_CACHE_DIR to another folder") from None


def _load(path: Path, identity: dict) -> tuple[dict, tuple[PackedRecords, IntTable]] | None:
    """(header, (records, ids)) mapped from ``path``; None unless it is a whole file of ours for ``identity``."""
    try:
        if not ours_alone(os.lstat(path)):
            return None
        data = np.load(path, mmap_mode="r", allow_pickle=False)
        if data.dtype != np.uint8 or data.ndim != 1 or data.size < 16:
            return None
        size, count = (int(v) for v in np.frombuffer(data[:16], dtype="<i8"))
        header = json.loads(bytes(data[16:16 + size]))
        if header.get("identity") != identity or count != len(header["ids"]) + 1:
            return None
        if any(_mtime_ns(identity["root"], folder) != mtime for folder, mtime in header["folders"].items()):
            return None
        offsets = data[16 + size:16 + size + 8 * count].view("<i8")
        buffer = data[16 + size + 8 * count:]
        if len(offsets) != count or offsets[0] != 0 or offsets[-1] != buffer.size:
            return None
    except (OSError, ValueError, KeyError, TypeError):  # absent, cut short or not ours: written anew
        return None
    return header, (PackedRecords.from_arrays(offsets, buffer), IntTable(header["ids"]))


def _child(read: Callable[[], CocoSplit], path: Path | None, identity: dict, send) -> None:
    try:
        split = read()
        packed = pack_images(split.data, split.categories)
        if path is not None:
            _write(path, split, packed, identity)
            send.send(None)
            return
        parts = (_header(split, packed, identity, {}), *packed[0].arrays())  # folders key a written file alone
        views = [memoryview(part).cast("B") for part in parts]
        send.send(("sent", [len(view) for view in views]))
        for view in views:  # raw, after that message: the parent reads each into place
            while view:
                view = view[os.write(send.fileno(), view):]
    except UsageError as exc:
        send.send(("usage", str(exc)))
    except BaseException:  # a bug: its traceback goes to the parent, which raises it
        send.send(("bug", traceback.format_exc()))


def _read_in_child(read: Callable[[], CocoSplit], path: Path | None, identity: dict):
    """``read()`` packed by a forked child, written to ``path`` (None: sent back, -> (header, packed)): the parsed
    JSON's objects never enter this process, whose peak stays that of its imports, and whose heap is not left
    fragmented by them for the loader workers it forks."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(read, path, identity, send), name="lomar-coco-reader")
    child.start()
    send.close()
    try:
        outcome = receive.recv()
        if outcome and outcome[0] == "sent":  # read before the join: the child blocks until the pipe is drained
            header, offsets, buffer = (np.empty(size, dtype=np.uint8) for size in outcome[1])
            for part in (header, offsets, buffer):  # into place: recv_bytes(_into) holds each twice for a while
                view = memoryview(part)
                while view:
                    if not (count := os.readv(receive.fileno(), [view])):
                        raise EOFError
                    view = view[count:]
    except EOFError:  # ended without a word: killed (by the system, short of memory) or crashed
        child.join()
        fix = "the system kills a process short of memory: free memory on this machine (fewer processes or loader " \
              "workers beside it)" if child.exitcode == -9 else "see its messages above"
        raise UsageError(f"the process reading {identity['ann']} ended with exit code {child.exitcode} before "
                         f"packing it; {fix}") from None
    except BaseException:  # this process stopped (a signal's exception, Ctrl-C): its exit would wait out the parse
        child.kill()  # not terminate: a child caught by SIGTERM mid-send would block on the undrained pipe
        child.join()
        raise
    child.join()
    if outcome is None:
        return None
    kind, text = outcome
    if kind == "usage":
        raise UsageError(text)
    if kind == "bug":
        raise RuntimeError(f"reading {identity['ann']} failed in its reading process:\n{text}")
    header = json.loads(header.tobytes())
    records = PackedRecords.from_arrays(offsets.view(np.int64), buffer)
    return header, (records, IntTable(header["ids"]))


def _split(ann_file, image_root, header: dict, packed) -> CocoSplit:
    return CocoSplit(Path(ann_file), Path(image_root), {"categories": header["category_entries"]},
                     header["categories"], CocoSummary(**header["summary"]), packed=packed)


def shared_split(read: Callable[[], CocoSplit], ann_file, image_root, split: str, keep: bool = False) -> CocoSplit:
    """``read()`` (a :func:`~lomar.data.coco.read_coco`, maybe through ``training_split``) of ``ann_file``, as this
    machine's processes share it (on Linux; elsewhere ``read()`` itself). Outside torchrun, or with one process per
    machine, a forked child reads and packs it and sends the records back; else the first process of the machine has a
    child write them to a file (unless a matching one is there) and every process maps it. Either way the split returned
    holds only its categories in ``data`` and its records in ``packed``. ``split`` names the reading (e.g. "train",
    "val"); ``keep``: this process needs the whole dict too (the evaluating one), so it reads it itself, and shares what
    it packed."""
    if not sys.platform.startswith("linux"):  # the child is forked: macOS's fork is unsafe beside its frameworks
        return read()
    if not _shared() or (folder := _our_folder()) is None:  # each process reads; the dict stays in a child
        return read() if keep else _split(ann_file, image_root, *_read_in_child(read, None, {"ann": str(ann_file)}))
    if not Path(ann_file).is_file() or not Path(image_root).is_dir():  # read() refuses it naming its flag
        return read()
    name, identity = _identity(ann_file, image_root, split)
    path = folder / name
    if first_on_machine():
        _prune(path)  # before the read: touched first, the file our other processes wait for is not another's to prune
        found = _load(path, identity)
        if keep:
            whole = read()
            if found is None:
                packed = pack_images(whole.data, whole.categories)
                _write(path, whole, packed, identity)
                whole.packed = packed
            else:
                whole.packed = found[1]
            return whole
        if found is None:
            _read_in_child(read, path, identity)
            found = _load(path, identity)
            if found is None:
                raise UsageError(f"the packed annotations {path} were written but cannot be read back; delete the "
                                 f"file, or set LOMAR_CACHE_DIR to another folder")
        return _split(ann_file, image_root, *found)
    start = time.monotonic()
    while (found := _load(path, identity)) is None:
        if time.monotonic() - start > WAIT_S:
            raise UsageError(f"waited {WAIT_S:g} s for this machine's first process to pack {ann_file} into "
                             f"{path}; see its messages, or set LOMAR_CACHE_DIR to a folder of this machine")
        time.sleep(_POLL_S)
    if keep:
        whole = read()
        whole.packed = found[1]
        return whole
    return _split(ann_file, image_root, *found)
