"""The image members of one tar shard (:mod:`lomar.data.shards`), and what a whole pass over a shard's headers
counted, kept so that the next count of the same unchanged file in this process need not read them all again: a
single tar of ImageNet holds 1.28M headers, ~90 s to read."""

from __future__ import annotations

import io
import logging
import os
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

from lomar.data.decode import max_image_bytes
from lomar.data.image_names import is_image_name, passed_over_folder

__all__ = ["image_members", "drawn_members", "scanned_count", "read_ahead", "file_identity"]

log = logging.getLogger("lomar.data")
# str(shard) -> (its identity when read, image members, members passed over): whole clean passes of drawn_members
_SCANNED: dict[str, tuple[tuple[int, ...], int, list[tuple[str, str]]]] = {}
# what a damaged shard raises; EOFError: gzip's, at a compressed stream cut off (a .tar.gz shard copied in part)
_DAMAGE = (OSError, EOFError, tarfile.TarError)


def file_identity(path: Path) -> tuple[int, ...] | None:
    """What tells ``path`` as it is now from any other version of it (None: it cannot be stat'ed): a file replaced by
    a rename, or rewritten in place, has another."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    # ctime too: a tool that rewrites a file in place and restores its mtime (rsync --inplace -t) cannot set it back
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def scanned_count(shard: Path, passed: list[tuple[str, str]]) -> int | None:
    """The image members a whole clean pass of :func:`drawn_members` in this process counted in ``shard`` (its
    passed-over members appended to ``passed``, as :func:`image_members` lists them), if the file is unchanged since;
    else None. Taken once: the record is dropped, so that loader workers forked later do not carry it."""
    record = _SCANNED.pop(str(shard), None)
    if record is None or record[0] != file_identity(shard):
        return None
    passed.extend(record[2])
    return record[1]


def read_ahead(shards: list[Path]) -> None:
    """Read the shards' headers now, for :func:`scanned_count` to take: a process that waits on another (for BEiT's
    tokenizer under torchrun) counts its shards meanwhile, not after."""
    for shard in shards:
        drawn_members(shard, 0, random.Random(0))


def image_members(shard: Path, read: bool = True, damaged: dict[str, str] | None = None,
                   passed: list[tuple[str, str]] | None = None) -> Iterator[tuple[str, bytes | int | str | None]]:
    """("shard:member", bytes (its size instead when over :func:`max_image_bytes`), or None unless ``read``)
    for the image members of one shard, less those a folder search passes over, listed in ``passed`` when given as
    (:func:`_passed_over`'s why, "shard:member"): those in its folders (a tar of a Synology NAS's folder holds several
    thumbnails of each photo in @eaDir, readable JPEGs, and a share's #recycle its deleted photos) and hidden ones.

    An unreadable shard yields nothing and a truncated one what precedes the damage; the
    reason goes into ``damaged`` (when given) and to the debug log. Without ``read`` only
    headers are read, so a member whose data is cut off still
    counts (the epoch length is an estimate for damaged shards; its bad samples are skipped).
    """
    try:
        archive = tarfile.open(shard)
    except _DAMAGE as exc:
        # one line: tarfile's auto-detection gives each compression it tried a line of its own
        _damaged(damaged, shard, f"unreadable, skipped ({' '.join(str(exc).split())})")
        return
    limit = max_image_bytes()
    with archive:
        try:
            for member in archive:
                if not _is_image(member):
                    continue
                name = f"{shard}:{member.name}"
                if why := _passed_over(member):
                    if passed is not None:
                        passed.append((why, name))
                    continue
                yield name, _member_data(archive, member, limit) if read else None
        except _DAMAGE as exc:  # a truncated shard: keep what was read
            _damaged(damaged, shard, f"damaged after some samples, the rest skipped ({exc})")


def drawn_members(shard: Path, count: int, rng: random.Random) -> list[tuple[str, bytes | int | str]]:
    """``count`` of :func:`image_members`'s members drawn with ``rng``, in file order, in one pass: a reservoir whose
    entrants' bytes alone are read (going back for the drawn ones after the headers decompresses a gzipped shard
    again, up to its end); from a truncated shard, of the members before the damage. A clean pass's count is kept for
    :func:`scanned_count`."""
    kept: list[tuple[int, str, bytes | int | str]] = []
    seen, passed, identity = 0, [], file_identity(shard)
    try:
        with tarfile.open(shard) as archive:
            for member in archive:
                if not _is_image(member):
                    continue
                if why := _passed_over(member):
                    passed.append((why, f"{shard}:{member.name}"))
                    continue
                slot = seen if seen < count else rng.randrange(seen + 1)
                seen += 1
                if slot < count:  # appended while the reservoir fills, then replacing the one drawn
                    kept[slot:slot + 1] = [(seen, f"{shard}:{member.name}",
                                            _member_data(archive, member, max_image_bytes()))]
    except _DAMAGE:
        identity = None  # a damaged shard: counted and reported by count_samples' own pass
    if identity is not None:
        _SCANNED[str(shard)] = (identity, seen, passed)
    return [(name, data) for _, name, data in sorted(kept)]


def _is_image(member: tarfile.TarInfo) -> bool:
    # a hard or symbolic link (tar stores a file's second name so) is a sample, read from its target
    return (member.isfile() or member.islnk() or member.issym()) and is_image_name(member.name)


def _passed_over(member: tarfile.TarInfo) -> str | None:
    """Why a folder search would leave the image member out: "folder" (it is in a hidden, thumbnail or recycle-bin
    folder), "hidden" (its own name begins with '.', as image_search's rule for a file: .NAME.jpg), else None."""
    parts = member.name.split("/")
    if any(passed_over_folder(part) for part in parts[:-1]):
        return "folder"
    return "hidden" if parts[-1].startswith(".") else None


def _member_data(archive: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes | int | str:
    if not member.isfile():
        return _read_link(archive, member, limit)
    if member.size > limit:  # the folder path's bound, from the header: never read into memory
        return member.size
    handle = archive.extractfile(member)
    return handle.read() if handle else b""


def _read_link(archive: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes | int | str:
    """What a link member's target within the shard holds: its bytes, its size when over ``limit`` (left
    unread), or why it has none."""
    try:
        handle = archive.extractfile(member)  # resolves the link inside the archive only, as tar would
    except (KeyError, RecursionError):  # a target the shard does not hold; a loop of symbolic links
        return f"a link to {member.linkname}, which the shard does not hold as a file"
    if handle is None:
        return f"a link to {member.linkname}, which is not a file"
    with handle:
        size = handle.seek(0, io.SEEK_END)
        return size if size > limit else (handle.seek(0), handle.read())[1]


def _damaged(record: dict[str, str] | None, shard: Path, reason: str) -> None:
    log.debug("tar shard %s: %s", shard, reason)
    if record is not None:
        record[str(shard)] = reason
