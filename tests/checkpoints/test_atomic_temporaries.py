"""atomic_write's temporary is its writer's own: a folder shared by machines (a home on NFS) sees the same PID in two
of them, so a name made of the PID alone would be one both writers use."""

from __future__ import annotations

import os
import threading

from lomar.checkpoints.io import atomic_write, atomic_write_bytes


def _step(event: threading.Event) -> None:
    assert event.wait(10), "the other writer never got there"


def test_two_writers_of_one_pid_never_leave_the_target_half_written(tmp_path, monkeypatch):
    """B is mid-write when A (another machine, the same PID) starts: A neither removes B's temporary nor writes into
    a file of its name, so B's rename puts B's whole file over the target, then A's rename A's. Each writes and
    renames its own."""
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    target, half = tmp_path / "last.pt", 1000
    b_half, a_half, a_may_end = threading.Event(), threading.Event(), threading.Event()
    failures = []

    def write_b(handle):
        handle.write(b"B" * half)
        b_half.set()
        _step(a_half)
        handle.write(b"B" * half)

    def write_a(handle):
        handle.write(b"A" * half)
        a_half.set()
        _step(a_may_end)
        handle.write(b"A" * half)

    def writer(write):
        try:
            atomic_write(target, write)
        except Exception as exc:  # noqa: BLE001 (the test names it below)
            failures.append(exc)

    b = threading.Thread(target=writer, args=(write_b,))
    b.start()
    _step(b_half)
    a = threading.Thread(target=writer, args=(write_a,))
    a.start()
    b.join(10)
    assert target.read_bytes() == b"B" * 2 * half  # not A's first half: A writes into a temporary of its own
    a_may_end.set()
    a.join(10)
    assert not failures  # A's rename finds its own temporary, which B's rename left
    assert target.read_bytes() == b"A" * 2 * half
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_temporary_of_another_writer_is_neither_removed_nor_written(tmp_path, monkeypatch):
    """A file of the name another writer of this PID would use (its live temporary, or a link planted there) stays as it
    is: a writer neither removes nor reuses a temporary's name it did not make."""
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    theirs = tmp_path / ".last.pt.tmp-4242"
    theirs.write_bytes(b"another machine's writer, mid-write")
    tokens = iter(["0" * 16, "1" * 16])
    monkeypatch.setattr("secrets.token_hex", lambda n: next(tokens))
    taken = tmp_path / f".last.pt.tmp-4242-{'0' * 16}"  # the first name this writer draws: another's
    taken.write_bytes(b"theirs too")
    atomic_write_bytes(tmp_path / "last.pt", b"weights")
    assert (tmp_path / "last.pt").read_bytes() == b"weights"
    assert theirs.read_bytes() == b"another machine's writer, mid-write" and taken.read_bytes() == b"theirs too"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt", theirs.name, taken.name])
