"""What an export leaves in its folder while it writes, judged by another export on a folder shared by machines."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading

import torch
from safetensors.torch import load_file

from lomar.checkpoints.export_leftovers import interrupted_export
from lomar.checkpoints.export_write import write_export


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def _export(folder, tag: str) -> None:
    write_export(folder, "model.safetensors", {"w": torch.full((4,), float(len(tag)))},
                 {"weights": "model.safetensors", "tag": tag})


def test_an_export_keeps_what_another_machines_live_export_is_writing(tmp_path, monkeypatch):
    """Without flock, a folder shared by two machines: an export there, mid-swap (its previous pair set aside, the new
    one not yet in), runs under a PID that is no process here. An export here took its files for a killed export's
    and removed them, the set-aside previous export with them, and the export there then failed. Its files name its
    machine: kept, and it ends with its pair whole."""
    folder, dead = tmp_path / "shared", _dead_pid()
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

    def no_flock(handle, flags):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("fcntl.flock", no_flock)
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
    assert interrupted_export(folder) == ""  # old code: named as an interrupted export's
    _export(folder, "here")
    resume.set()
    there.join(10)
    assert not failures  # old code: FileNotFoundError, its files removed by the export here
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["tag"] == "from node b"
    assert load_file(folder / "model.safetensors")["w"].tolist() == [11.0] * 4  # its weights with its config
