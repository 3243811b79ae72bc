"""WebDataset-style tar shards as an iterable pretraining dataset.

Read with the standard library's ``tarfile``: every image member of a shard is one sample
(WebDataset's companion members such as ``.cls`` or ``.json`` are ignored; this is
self-supervised). Shards are spread over distributed ranks and loader workers, their order is
shuffled each epoch, and a small buffer mixes samples across shards, all seeded by
(seed, epoch), so an epoch's stream is reproducible for a fixed number of ranks and workers.

Why not the ``webdataset`` package: the two things this reader exists for are a pure function
of (seed, epoch, sample name) for every sample's augmentation, and a mid-epoch resume that
skips consumed samples without decoding them. Both need control of the exact order in which
shards are split over ranks and workers and of the shuffle buffer's generator; webdataset
seeds its splitting and shuffling from its own per-worker ``random`` state and would have to be
overridden stage by stage, which leaves less of it than these ~150 lines of ``tarfile`` (and
a dependency, with its own ones, to pin). Damaged shards are reported once, by
:meth:`TarShardDataset.count_samples`, and counted in ``damaged``.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import TypeVar

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lomar.data.decode import decode_bytes, max_image_bytes
from lomar.data.image_errors import READ, ImageFileError
from lomar.data.shard_members import drawn_members, image_members, scanned_count
from lomar.data.transforms import Masker, PretrainTransform, make_item, sample_generator

__all__ = ["TarShardDataset", "is_shard_pattern", "shard_paths"]

T = TypeVar("T")
log = logging.getLogger("lomar.data")
# Generator "indices" for stream-level randomness, above every crc32 sample index (< 2**32).
_ORDER_INDEX = 2 ** 40
_BUFFER_INDEX = 2 ** 40 + 1
_SPREAD_INDEX = 2 ** 41  # above every slot's _BUFFER_INDEX + slot


MAX_SHARD_NAMES = 1_000_000  # a brace pattern's names (LAION-5B has 231,350 shards); a typo can ask for 10^9
# Shards are read plain or gzipped: a shard of 1,000 400 px JPEGs (42 MB) gzips 4.5 % smaller and reading it then
# costs 0.25 s of CPU, not 0.1, against 8.6 s to decode and crop its images (2-core machine, 2026-12-06). bzip2
# (4.1 s) and xz (2.9 s) cost that every epoch, and again to count the samples at every start: refused by content
# (tarfile reads a compressed shard named .tar without a word), as is zstd where tarfile has no reader (before 3.14).
# Their names are shard patterns too, so that they reach the refusal.
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst")
_REFUSED_SUFFIXES = (".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
_SLOW = "whose decompression costs {} the time of decoding its images, each epoch and again at every start"
_REFUSED_STARTS = {b"BZh": ("bzip2", "bunzip2 -c", _SLOW.format("half")),
                   b"\xfd7zXZ\x00": ("xz", "xz -dc", _SLOW.format("a third of")),
                   **({} if "zst" in tarfile.TarFile.OPEN_METH else
                      {b"\x28\xb5\x2f\xfd": ("zstd", "zstd -dc", "which this Python's tarfile does not read")})}


def is_shard_pattern(data: str) -> bool:
    """A glob or brace pattern of tar files (``.tar``, ``.tar.gz``, ``.tgz``; compressed otherwise too, for
    :func:`shard_paths` to refuse), or one existing such file."""
    if not data.lower().endswith(SHARD_SUFFIXES + _REFUSED_SUFFIXES):
        return False
    return any(c in data for c in "*?[{") or Path(data).is_file()


def _first_brace(pattern: str) -> tuple[str, range | list[str], int, str] | None:
    """(head, options, zero-padded width, tail) of ``pattern``'s first brace: a range for ``{000..009}``, a
    list for ``{a,b}``; None without a brace. ValueError when it does not close or its range is not of
    whole numbers."""
    start = pattern.find("{")
    if start < 0:
        return None
    end = pattern.index("}", start)
    body = pattern[start + 1:end]
    if ".." in body:
        lo, hi = body.split("..")
        return pattern[:start], range(int(lo), int(hi) + 1), len(lo), pattern[end + 1:]
    return pattern[:start], body.split(","), 0, pattern[end + 1:]


def _expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` and ``{a,b}`` (WebDataset's shard notation)."""
    if (brace := _first_brace(pattern)) is None:
        return [pattern]
    head, options, width, tail = brace
    names = [str(i).zfill(width) for i in options] if isinstance(options, range) else options
    return [p for name in names for p in _expand_braces(head + name + tail)]


def _brace_count(pattern: str) -> int:
    """How many names :func:`_expand_braces` gives, without making them."""
    if (brace := _first_brace(pattern)) is None:
        return 1
    return len(brace[1]) * _brace_count(brace[3])


def shard_paths(data: str) -> list[Path]:
    """Existing shard files matching a glob / brace pattern, sorted; ValueError when none."""
    try:
        names = _brace_count(data)
    except ValueError:
        raise ValueError(f"{data!r}: each brace must close and hold a range of whole numbers ({{000..099}}) or "
                         f"a list ({{a,b}})") from None
    if names > MAX_SHARD_NAMES:
        raise ValueError(f"{data!r} names {names:,} shards, over the {MAX_SHARD_NAMES:,} lomar reads; check the "
                         f"brace range")
    patterns = _expand_braces(data)
    found = {pat: _matches(pat) for pat in patterns}
    paths = sorted({Path(p) for matches in found.values() for p in matches})
    if not paths:
        raise ValueError(f"no tar shards match {data!r}; check the glob or brace pattern")
    if odd := [path for path in paths if not path.is_file()]:  # opening a FIFO blocks until something writes to it
        raise ValueError(f"{data!r} matches {odd[0]}, which is not a regular file (a folder, a named pipe or a "
                         f"device); narrow the pattern or remove it")
    # a name without wildcards is a shard asked for by name: one missing would shrink the data unsaid
    missing = [pat for pat in patterns if not glob.has_magic(os.path.basename(pat)) and not found[pat]]
    if missing:
        raise ValueError(f"{data!r} names {len(missing)} shard(s) that do not exist, e.g. {missing[0]}; fix the "
                         f"brace range or add the shards")
    for path in paths:
        _check_compression(path)
    return paths


def _check_compression(path: Path) -> None:
    """ValueError when the shard is compressed in a form lomar refuses (see :data:`SHARD_SUFFIXES`)."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(6)
    except OSError:  # unreadable: count_samples says so, and leaves it out
        return
    for magic, (kind, command, why) in _REFUSED_STARTS.items():
        if start.startswith(magic):
            raise ValueError(f"tar shard {path} is {kind}-compressed, {why}; decompress it ({command} {path} > "
                             f"NEW.tar), or gzip the tar (2 % of the decoding time)")


def _matches(pattern: str) -> list[str]:
    """The files ``pattern`` names: itself when it is one (a folder named 'set [v2]' is no character class), else
    its glob matches, else those of its last part in its folder taken literally."""
    if Path(pattern).is_file():
        return [pattern]
    folder, name = os.path.split(pattern)
    return glob.glob(pattern) or (glob.glob(os.path.join(glob.escape(folder), name)) if folder else [])


def _buffer_shuffle(items: Iterable[T], size: int, gen: torch.Generator) -> Iterator[T]:
    """Streaming shuffle through a buffer of ``size`` items (WebDataset's usual scheme)."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(torch.randint(len(buffer), (1,), generator=gen))
        buffer[j], item = item, buffer[j]
        yield item
    for j in torch.randperm(len(buffer), generator=gen).tolist():
        yield buffer[j]


class TarShardDataset(IterableDataset):
    """WebDataset-style tar shards, split across distributed ranks and loader workers.

    Each sample's augmentation is seeded by (seed, epoch, shard:member name), the shard named under the shards'
    common folder (``seed_root``), so the same shards moved or copied elsewhere train alike. With at least as
    many shards as ranks x workers, each reader takes whole shards; with fewer, every reader
    walks all the shards and keeps every n-th sample, so that no rank ends up without data.
    Given ``batches`` (:meth:`set_epoch`), every reader delivers exactly its share of them: one
    whose shards hold less reads them again (the same samples, the same draws), one whose shards
    hold more leaves the rest for later epochs. So every rank takes the same number of steps
    however uneven the shards, and no loader runs short of an epoch.

    Mid-epoch resume is best effort: ``set_epoch(epoch, skip, batch_size)`` drops the samples
    this rank already consumed without decoding them. That reproduces the interrupted stream
    exactly when the rank and worker counts are unchanged and no worker ran dry before the
    resume point; otherwise samples may repeat or be missed.
    """

    def __init__(self, shards: list[Path], transform: PretrainTransform, seed: int = 0,
                 masker: Masker | None = None, rank: int | None = None, world_size: int | None = None,
                 shuffle_buffer: int = 256):
        self.shards, self.transform, self.seed, self.masker = list(shards), transform, seed, masker
        self.rank, self.world_size = rank, world_size  # None: ask torch.distributed when iterating
        self.shuffle_buffer = shuffle_buffer  # holds encoded bytes only: ~100 kB per photo
        # (epoch, items to skip, batch size, batches or 0) in shared memory, so that set_epoch in the main
        # process reaches persistent workers, which keep the dataset copy they started with.
        self._state = torch.tensor([0, 0, 1, 0], dtype=torch.int64).share_memory_()
        self.damaged: dict[str, str] = {}  # filled by count_samples
        self.counts: dict[str, int] = {}  # shard -> image members, filled by count_samples
        # A sample's seed reads its name without this prefix: the shards moved to a node's local disk, or resumed
        # from another mount, draw the same crops and masks ('' seeds by the whole path, as runs saved before did)
        self.seed_root = os.path.join(os.path.commonpath([os.fspath(s.parent) for s in self.shards]), "") \
            if self.shards else ""

    def set_epoch(self, epoch: int, skip: int = 0, batch_size: int = 1, batches: int | None = None) -> None:
        """Start epoch ``epoch``; ``skip``: this rank's items already consumed in it (resume); ``batches``:
        the batches of ``batch_size`` this rank's loader is to deliver in the epoch, exactly (None: as
        many as its shards hold, which per-worker ``drop_last`` and uneven shards make unpredictable)."""
        self._state.copy_(torch.tensor([epoch, skip, max(1, batch_size), batches or 0]))

    def count_samples(self) -> int:
        """Image members in all readable shards (tar headers only).

        Unreadable or damaged shards are warned about here, once, and listed in ``damaged``
        (shard -> reason); iterating over them later only logs at debug level."""
        self.damaged: dict[str, str] = {}
        passed: list[tuple[str, str]] = []
        self.counts = {}
        for shard in self.shards:  # a shard the tokenizer's draw (spread) read whole is not read again
            known = scanned_count(shard, passed)
            self.counts[str(shard)] = known if known is not None else sum(
                1 for _ in image_members(shard, read=False, damaged=self.damaged, passed=passed))
        total = sum(self.counts.values())
        for shard, reason in self.damaged.items():
            log.warning("tar shard %s: %s", shard, reason)
        if in_folders := [name for why, name in passed if why == "folder"]:
            log.warning("tar shards: %d member(s) in hidden, thumbnail or recycle-bin folders skipped, e.g. %s (as a "
                        "folder search passes them over)", len(in_folders), in_folders[0])
        if hidden := [name for why, name in passed if why == "hidden"]:
            log.warning("tar shards: %d hidden image member(s) skipped, e.g. %s (as a folder search leaves out a "
                        "hidden file; name it without a leading '.' to use it)", len(hidden), hidden[0])
        return total

    def _readers(self) -> tuple[int, int, int, int]:
        """(rank, world size, worker id, workers in this rank's loader)."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return rank, world, worker, workers

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = self._readers()
        epoch, skip, batch, batches = self._state.tolist()
        # The loader takes batch b from worker b % workers, restarting at worker 0 on every
        # new iteration. After `done` batches, worker w therefore plays the part that worker
        # (w + done) % workers had, and skips the batches that one already delivered.
        done = skip // batch
        part = (worker + done) % workers
        mine = _batches_of(part, done, workers) * batch
        slot, slots = rank * workers + part, world * workers
        # The same shard order on every rank and worker: a function of (seed, epoch) only. Shards known
        # to hold no image are left out, so that no reader is dealt only those.
        usable = [shard for shard in self.shards if self.counts.get(str(shard), 1)]
        order = torch.randperm(len(usable), generator=sample_generator(self.seed, epoch, _ORDER_INDEX))
        shards = [usable[i] for i in order.tolist()]
        mixing = sample_generator(self.seed, epoch, _BUFFER_INDEX + slot)  # every pass's buffer, in turn

        def one_pass() -> Iterator[tuple[str, bytes | int | str]]:
            if len(shards) >= slots:
                members: Iterable[tuple[str, bytes | int | str]] = chain.from_iterable(
                    map(image_members, shards[slot::slots]))
            else:
                members = (m for i, m in enumerate(chain.from_iterable(map(image_members, shards)))
                           if i % slots == slot)
            return _buffer_shuffle(members, self.shuffle_buffer, mixing) if self.shuffle_buffer > 1 else members

        stream: Iterable[tuple[str, bytes | int | str]] = one_pass()
        if batches:  # exactly this part's share of the epoch, its shards read again if they hold less
            stream = islice(_passes(one_pass), _batches_of(part, batches, workers) * batch)
        for position, (name, data) in enumerate(stream):
            if position < mine:
                continue  # consumed before the resume: not decoded again
            yield self._item(name, data, epoch)

    def spread(self, count: int) -> Iterator[dict]:
        """Epoch-0 items drawn (seeded) across the shards, the same in every process, for a fit that is to see the
        whole set (BEiT's tokenizer): the stream's first ``count`` come from the one or two shards its reader opens
        first (a few classes, when shards are written class by class), and another set in each process. The shards
        in a seeded order, ``ceil(count / shards)`` members drawn from each, until the caller stops."""
        gen = sample_generator(self.seed, 0, _SPREAD_INDEX)
        each, rng = -(-count // max(1, len(self.shards))), random.Random(int(torch.randint(2 ** 62, (), generator=gen)))
        for i in torch.randperm(len(self.shards), generator=gen).tolist():
            for name, data in drawn_members(self.shards[i], each, rng):
                yield self._item(name, data, 0)

    def _item(self, name: str, data: bytes | int | str, epoch: int) -> dict:
        # surrogateescape: a member name that is not UTF-8 (tarfile decodes it so) seeds by its own bytes
        key = name.removeprefix(self.seed_root).encode("utf-8", "surrogateescape")
        gen = sample_generator(self.seed, epoch, zlib.crc32(key))
        return make_item(name, lambda: _decode_member(name, data), self.transform, gen, self.masker)


def _batches_of(part: int, batches: int, workers: int) -> int:
    """How many of batches 0 .. ``batches`` - 1 the loader takes from worker ``part`` (batch b from b % workers)."""
    return max(0, (batches - part + workers - 1) // workers)


def _passes(one_pass: Callable[[], Iterator[T]]) -> Iterator[T]:
    """``one_pass()``'s items, then those of another pass, and so on; stops when a pass yields nothing."""
    while True:
        empty = True
        for item in one_pass():
            empty = False
            yield item
        if empty:
            return


def _decode_member(name: str, data: bytes | int | str) -> torch.Tensor:
    """A member's pixels; ``data`` an int is the size of a member over the byte limit, left unread, a str why a
    link member has no file to read."""
    if isinstance(data, str):
        raise ImageFileError(name, f"{data}; fix or remove the link", READ)
    if isinstance(data, int):
        raise ImageFileError(name, f"{data:,} bytes is over the limit of {max_image_bytes():,} for one image; shrink "
                                   f"it or raise LOMAR_MAX_IMAGE_BYTES", READ)
    return decode_bytes(data, name)
