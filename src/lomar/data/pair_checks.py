"""What the up-front check of a segmentation split (:class:`lomar.data.segmentation.SegmentationFolder`) found in
each image/annotation pair, kept between runs, so that a pair whose two files are unchanged is not decoded again.

Decoding every annotation PNG is nearly all of the check's cost, at every start, resume, ``--eval-only`` and study
cell: 3,000 ADE-sized pairs (683x512 JPEGs, 8-bit PNGs of 150 classes) took 13.5 s on a loaded 2-core host, so
ADE20K's 22,210 nearly two minutes. A pair found in the cache costs opening its two files for their identity instead:
the same split was built in 0.27-0.43 s, listing its folders included. What is kept of a pair is what its check found,
not a verdict: the highest class id of its annotation (the ignored 255 aside) and the ids it holds (bit i set for id
i), for a pair whose files read and agree in size; ``--num-classes`` and ``--zero-label`` are judged against those ids
at every start, so changing either decodes nothing again, and a class in the validation masks that no training mask
holds is told from them without a second read.

An entry is used only while both files are as they were when checked: the same names, size, mtime_ns, ctime_ns and
inode, taken from the opened files before they are read. A write or a rename changes a file's ctime and no tool sets
it, so a file replaced with its size and mtime kept (``cp -p``, ``rsync -t``, ``tar x``) is read again, on a file
system that keeps a change time of its own (ext4, XFS, btrfs, NFS from one of those). Linux's FAT keeps a file's
ctime equal to its mtime, and FUSE mounts of remote folders such as sshfs give the mtime as the ctime: there a file
rewritten in place with its size and mtime put back keeps its identity, and its pair is taken as unchanged until the
cache file is deleted. A file changed twice within one tick of its file system's clock could keep all of these, so a
pair whose files changed less than :data:`RACY_S` before the check (by this machine's clock) is not kept: the next
start reads it again. The file is used only for the folder (resolved) and split it names, checked by the same code:
its header holds a digest of the modules that decide a pair's result, Pillow's version and the size limits
(``LOMAR_MAX_IMAGE_PIXELS``, ``LOMAR_MAX_IMAGE_BYTES``); another header means every pair is checked again.

One JSON file a folder and split (never a pickle: reading one runs what it says), in the user's cache folder
(:func:`lomar.data.user_cache.cache_folder`: ``~/.cache/lomar/segment`` unless ``$LOMAR_CACHE_DIR`` or
``$XDG_CACHE_HOME`` says otherwise), so that it serves every run on the same files. It is written atomically, and
only when what it holds changes; one that no start has used for :data:`UNUSED_S` (30 days) is removed when another is
written. A file that cannot be parsed, names another folder or split, holds a malformed entry, or is not a regular
file of this user's that no one else may write (whoever writes it could pass a bad pair unchecked) is ignored with a
warning, never trusted. Deleting it forces a full check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import PIL

from lomar.checkpoints.io import atomic_write_text
from lomar.data.decode import max_image_bytes, max_image_pixels
from lomar.data.user_cache import cache_folder, code_digest, ours_alone
from lomar.errors import exception_line
from lomar.values import counted, listed

__all__ = ["RACY_S", "UNUSED_S", "cache_file", "pair_results", "BadPairs", "BadSplit", "splits_refusal"]

log = logging.getLogger("lomar.data")
# above FAT's 2 s mtime tick, the coarsest a dataset sits on: a time rounded down to it reads up to 2 s early
RACY_S = 3.0
_FORMAT = 2  # 1: entries without the ids held
# a kept file that no start has used for this long is removed when another is written: a dataset copied to a folder of
# its own for each job (a node's local disk) leaves a file behind at every job, about 220 bytes a pair (ADE20K's: 5 MB)
UNUSED_S = 30 * 86400.0
# the modules whose code decides a pair's result: reading, decoding and checking the two files
_CHECK_MODULES = tuple(f"lomar.data.{name}" for name in ("segmentation", "decode", "headers", "jpeg_cut", "png_cut",
                                                         "tiff_cut", "pair_checks"))

# the bad pairs whose messages a refusal gives in full; the others' images are named
_SHOWN = 3
# of each split, where several splits' are refused together: the others are counted
_SHOWN_EACH = 2

Identity = list[int]  # size, mtime_ns, ctime_ns, inode


def cache_file(root: Path, split: str) -> Path:
    """Where the check of ``root``'s (resolved) ``split`` is kept; OSError where the user has no cache folder."""
    name = hashlib.sha256(json.dumps([str(root), split]).encode()).hexdigest()[:24]
    return cache_folder("segment") / f"{name}.json"


def _header(root: Path, split: str) -> dict:
    return {"format": _FORMAT, "root": str(root), "split": split, "code": code_digest(*_CHECK_MODULES),
            "pillow": PIL.__version__, "max_pixels": max_image_pixels(), "max_bytes": max_image_bytes()}


def _identity(path: Path) -> Identity | None:
    """The file's identity, of the opened file: an NFS client answers a stat from attributes it may hold for up to a
    minute, but asks the server when the file is opened (close-to-open), so a change made on another machine shows."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # not held up by a FIFO under an image's name
    except OSError:  # the check says what is wrong with it
        return None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def _valid(entry) -> bool:
    """Whether ``entry`` is [annotation name, image identity, annotation identity, highest class id, ids held]."""
    return (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[0], str)
            and all(isinstance(ids, list) and len(ids) == 4 and all(type(v) is int for v in ids) for ids in entry[1:3])
            and all(type(v) is int and v >= 0 for v in entry[3:]))


def _read_text(path: Path) -> str | None:
    """The file's text; None when there is none; ValueError when it is not a regular file of this user's that no one
    else may write (opened without following a link, then checked on the open file)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not ours_alone(os.fstat(handle.fileno())):
            raise ValueError("not a regular file of this user's that no one else may write")
        return handle.read().decode("utf-8")


def _read(path: Path, header: dict) -> dict[str, list]:
    """The entries of ``path`` when it is a check of ``header``'s; {} when there is none, another check's (other
    code, Pillow or limits), or one that cannot be trusted (said)."""
    try:
        text = _read_text(path)
        if text is None:
            return {}
        found = json.loads(text)
    except (OSError, ValueError) as exc:
        log.warning("%s cannot be used (%s): every pair is checked again", path, exception_line(exc))
        return {}
    head = found.get("header") if isinstance(found, dict) else None
    pairs = found.get("pairs") if isinstance(found, dict) else None
    if not isinstance(head, dict) or not isinstance(pairs, dict):
        log.warning("%s is not a segmentation pair check (a malformed header): every pair is checked again", path)
        return {}
    if (head.get("root"), head.get("split")) != (header["root"], header["split"]):
        log.warning("%s holds the check of %s (%s), not of %s (%s): every pair is checked again", path,
                    head.get("root"), head.get("split"), header["root"], header["split"])
        return {}
    # before the entries: those of another format (another lomar's) have another shape and are not damaged
    if head != header:  # another lomar, Pillow or size limit: its results may not be this one's
        changed = sorted(key for key in header if head.get(key) != header[key])
        log.info("%s: checked with another %s; every pair is checked again", path, ", ".join(changed))
        return {}
    if not all(map(_valid, pairs.values())):
        log.warning("%s is not a segmentation pair check (a malformed entry): every pair is checked again", path)
        return {}
    return pairs


def _write(path: Path, header: dict, pairs: dict[str, list]) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"header": header, "pairs": pairs}, separators=(",", ":")), mode=0o600)
    except OSError as exc:
        log.warning("cannot keep the check of the segmentation pairs in %s (%s): the next start checks every pair "
                    "again; set LOMAR_CACHE_DIR to a folder this user may write", path, exception_line(exc))
        return
    cutoff = time.time() - UNUSED_S
    for other in (*path.parent.glob("*.json"), *path.parent.glob(".*.json.tmp-*")):  # and killed writers' temporaries
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
            if other != path and other.lstat().st_mtime < cutoff:
                other.unlink()


def pair_results(root: Path, split: str, pairs: list[tuple[Path, Path]],
                 check: Callable[[Path, Path], tuple[int, int]],
                 workers: int) -> tuple[list[tuple[int, int] | None], BadPairs | None]:
    """``check(image, annotation)`` of each pair, in order (its highest class id and the ids it holds, bit i for id
    i; None for a pair whose check raised ValueError), taken from the cache for a pair whose files are unchanged since
    they passed; the others are checked on ``workers`` threads. Every pair is checked: those that failed are gathered
    in one :class:`BadPairs` (None when none did), for the caller to refuse with what it finds in the others, so that
    a split with several bad files is not fixed one run of a whole check at a time. The pairs that passed are kept,
    also when some fail."""
    root = Path(root).resolve()
    header = _header(root, split)
    try:
        path = cache_file(root, split)
    except OSError as exc:
        log.warning("cannot keep the check of the segmentation pairs (%s): every start checks every pair",
                    exception_line(exc))
        path = None
    known = _read(path, header) if path else {}
    settled = time.time_ns() - int(RACY_S * 1e9)  # taken before the stats: a file changed after them is not settled
    identities = [(_identity(image), _identity(annotation)) for image, annotation in pairs]
    results: list[tuple[int, int] | None] = [None] * len(pairs)
    for k, ((image, annotation), (seen_image, seen_annotation)) in enumerate(zip(pairs, identities)):
        entry = known.get(image.name)
        if entry is not None and seen_image and seen_annotation and entry[:3] == [annotation.name, seen_image,
                                                                                    seen_annotation]:
            results[k] = (entry[3], entry[4])
    todo = [k for k, result in enumerate(results) if result is None]
    if len(todo) < len(pairs):
        log.info("%s (split %s): %d of %d pairs unchanged since checked (%s); checking %d", root, split,
                 len(pairs) - len(todo), len(pairs), path, len(todo))
    failures: list[tuple[int, str]] = []

    def outcome(k: int) -> tuple[tuple[int, int] | None, str | None]:
        try:
            return check(*pairs[k]), None
        except ValueError as exc:
            return None, str(exc)

    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for k, (result, failure) in zip(todo, pool.map(outcome, todo)):
                results[k] = result
                if failure is not None:
                    failures.append((k, failure))
    finally:
        kept = {image.name: [annotation.name, *ids, *result]
                for (image, annotation), ids, result in zip(pairs, identities, results)
                if result is not None and all(i and max(i[1], i[2]) <= settled for i in ids)}
        if path and kept != known:
            _write(path, header, kept)
        elif path and known:
            with contextlib.suppress(OSError):  # a read-only cache folder: it is pruned by no one either
                os.utime(path)  # used: not another's to prune
    bad = BadPairs(split, len(pairs), [(pairs[k][0].name, message) for k, message in failures]) if failures else None
    return results, bad


def _shown(reasons: list[str], at_most: int) -> str:
    return " ".join(f"({n}) {reason}" for n, reason in enumerate(reasons[:at_most], 1))


class BadPairs(ValueError):
    """The pairs of a split whose check failed, refused together: ``split``, its ``total`` pairs and ``failed``, (image
    name, the check's message) of each, in order. The message: a single one's as it is; of several, the first
    :data:`_SHOWN` in full and the others' images named, with the count."""

    def __init__(self, split: str, total: int, failed: list[tuple[str, str]]):
        self.split, self.total, self.failed = split, total, failed
        if len(failed) == 1:
            super().__init__(failed[0][1])
            return
        rest = [image for image, _ in failed[_SHOWN:]]
        more = f"; and {counted(len(rest), 'more pair')}, of images {listed(rest, 5)}" if rest else ""
        super().__init__(f"{len(failed)} of the {total} image/annotation pairs of {split} cannot be used, each to fix "
                         f"or remove: {_shown([m for _, m in failed], _SHOWN)}{more}")

    def __reduce__(self):  # its arguments are not its message
        return type(self), (self.split, self.total, self.failed)


class BadSplit(ValueError):
    """A split refused as a whole: ``reason``, what is wrong with it (its folders' layout, a class id above those
    asked for), and ``pairs``, the bad pairs its check found besides (None where none were, or none were checked).
    The message: ``reason`` alone, or followed by the pairs'."""

    def __init__(self, split: str, reason: str, pairs: BadPairs | None = None):
        self.split, self.reason, self.pairs = split, reason, pairs
        super().__init__(reason if pairs is None else f"{reason}; and {pairs}")

    def __reduce__(self):  # its arguments are not its message
        return type(self), (self.split, self.reason, self.pairs)


def _part(bad: BadPairs | BadSplit, noun: str) -> str:
    """What one split's refusal says among several: its reasons, the split's own first, :data:`_SHOWN_EACH` of them
    in full and the other pairs counted."""
    pairs = bad.pairs if isinstance(bad, BadSplit) else bad
    reasons = ([bad.reason] if isinstance(bad, BadSplit) else []) + [m for _, m in (pairs.failed if pairs else ())]
    rest = len(reasons) - _SHOWN_EACH
    more = f"; and {counted(rest, 'more pair')}" if rest > 0 else ""
    shown = _shown(reasons, _SHOWN_EACH)
    if isinstance(bad, BadSplit):
        bad_pairs = f" ({len(pairs.failed)} of its {pairs.total} image/annotation pairs bad)" if pairs else ""
        return f"In {bad.split}{bad_pairs}: {shown if len(reasons) > 1 else bad.reason}{more}."
    return f"In {bad.split}, {len(bad.failed)} of the {bad.total}{noun}: {shown}{more}."


def splits_refusal(refused: list[BadPairs | BadSplit]) -> ValueError:
    """One error for what is wrong with several splits, each checked whole first, so that one run tells it all: of
    each split its own reason (:class:`BadSplit`) and its bad pairs' messages, the first :data:`_SHOWN_EACH` of them
    in full, then the count of the others; one split's as it is."""
    if len(refused) == 1:
        return refused[0]
    splits = " and ".join(bad.split for bad in refused)
    if not any(isinstance(bad, BadSplit) for bad in refused):
        return ValueError(f"image/annotation pairs of {splits} cannot be used, each to fix or remove. "
                          f"{' '.join(_part(bad, '') for bad in refused)}")
    return ValueError(f"{splits} cannot be used, each to fix. "
                      f"{' '.join(_part(bad, ' image/annotation pairs') for bad in refused)}")
