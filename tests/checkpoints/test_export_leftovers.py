"""What an export leaves in its folder while it writes, judged by another export on a folder shared by machines."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
import torch
from safetensors.torch import load_file

from helpers import dead_pid, no_flock
from lomar.checkpoints.export_leftovers import interrupted_export
from lomar.checkpoints.export_write import write_export


def _export(folder, tag: str) -> None:
    write_export(folder, "model.safetensors", {"w": torch.full((4,), float(len(tag)))},
                 {"weights": "model.safetensors", "tag": tag})


def test_an_export_keeps_what_another_machines_live_export_is_writing(tmp_path, monkeypatch):
    """Without flock, a folder shared by two machines: an export there, mid-swap (its previous pair set aside, the new
    one not yet in), runs under a PID that is no process here. Its files name its machine, so an export here does not
    take them for a killed export's: they are kept (the set-aside previous export with them), and it ends with its
    pair whole."""
    folder, dead = tmp_path / "shared", dead_pid()
    _export(folder, "first")
    there, paused, resume = None, threading.Event(), threading.Event()
    getpid, hostname, rename = os.getpid, socket.gethostname, os.replace

    def elsewhere() -> bool:
        return threading.current_thread() is there

    def pausing_rename(src, dst):
        rename(src, dst)
        if elsewhere() and ".old-" in os.fspath(dst) and "safetensors" in os.fspath(dst):  # the old pair aside
            paused.set()
            assert resume.wait(10)

    no_flock(monkeypatch)
    monkeypatch.setattr(os, "getpid", lambda: dead if elsewhere() else getpid())
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b.cluster" if elsewhere() else hostname())
    monkeypatch.setattr(os, "replace", pausing_rename)
    failures = []

    def export_there():
        try:
            _export(folder, "from node b")
        except Exception as exc:  # noqa: BLE001 (named below)
            failures.append(exc)

    there = threading.Thread(target=export_there)
    there.start()
    assert paused.wait(10), "the export there never reached its pause"
    assert interrupted_export(folder) == ""  # not named as an interrupted export's
    _export(folder, "here")
    resume.set()
    there.join(10)
    assert not failures  # not FileNotFoundError: the export here leaves its files
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["tag"] == "from node b"
    assert load_file(folder / "model.safetensors")["w"].tolist() == [11.0] * 4  # its weights with its config


def test_an_older_lomars_leftovers_named_by_the_pid_alone_are_this_machines(tmp_path, monkeypatch):
    """An export killed midway by an older lomar left its previous pair at .NAME.old-PID (and its incoming file at
    .NAME.new-PID, atomic_write's ..NAME.new-PID.tmp-PID): taken for this machine's, the reader names the set-aside
    files and the next export removes them, where no flock tells only those of a PID that is no live process here."""
    dead, live = dead_pid(), os.getppid()
    _export(tmp_path, "first")
    for name in ("config.json", "model.safetensors"):
        os.replace(tmp_path / name, tmp_path / f".{name}.old-{dead}")
    assert ".config.json.old-" in interrupted_export(tmp_path) and "rename them back to config.json" in \
        interrupted_export(tmp_path)
    (tmp_path / f"..config.json.new-{dead}.tmp-{dead}").write_bytes(b"x")
    _export(tmp_path, "second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]

    no_flock(monkeypatch)
    stale, alive = [f".config.json.old-{dead}", f".model.safetensors.new-{dead}"], [f".config.json.new-{live}"]
    for name in stale + alive:
        (tmp_path / name).write_bytes(b"x")
    _export(tmp_path, "third")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(alive + ["config.json", "model.safetensors"])


def _set_aside(folder, host: str, pid: int) -> str:
    """``folder``'s export (config.json, model.safetensors) set aside as a write_export on ``host`` does mid-swap."""
    _export(folder, "previous")
    tag = f"{host}-{pid}-0123456789abcdef"
    for name in ("config.json", "model.safetensors"):
        os.replace(folder / name, folder / f".{name}.old-{tag}")
    return tag


def test_a_reader_of_an_export_under_way_is_told_to_wait_not_to_rename_its_files(tmp_path):
    """An export holding the folder's lock is live: renaming its set-aside files back under it would undo its swap, so
    the refusal names its holder and says to wait, not 'or one on another machine was interrupted ... rename them
    back'."""
    from lomar.checkpoints.export_leftovers import export_lock, writer_tag
    from lomar.checkpoints.formats import read

    tag = _set_aside(tmp_path, writer_tag().split("-")[0], os.getpid())
    with export_lock(tmp_path), pytest.raises(ValueError) as refused:
        read(tmp_path)
    words = str(refused.value)
    assert f"an export into it is under way (pid {os.getpid()} on {socket.gethostname()}, holding its lock" in words
    assert f"set aside as .config.json.old-{tag}, .model.safetensors.old-{tag} (read it once that export ends)" in words
    assert "rename" not in words


def test_a_reader_of_another_machines_export_without_a_lock_names_that_machine(tmp_path, monkeypatch):
    """Without flock, another machine's export cannot be judged from here: the refusal names that machine, to wait
    for its export or, were it interrupted, rename the files back."""
    from lomar.checkpoints.formats import read

    no_flock(monkeypatch)
    tag = _set_aside(tmp_path, "elsewhere", 1)
    with pytest.raises(ValueError) as refused:
        read(tmp_path)
    assert (f"an export into it from elsewhere set its previous files aside as .config.json.old-{tag}, "
            f".model.safetensors.old-{tag}, and no lock tells here whether it still runs (read it once that export "
            f"ends, or, if it was interrupted, rename them back to config.json, model.safetensors)") \
        in str(refused.value)
