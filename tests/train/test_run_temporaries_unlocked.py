"""A run's start in a folder whose filesystem has no flock: the temporaries there stay, and the run says so."""

from __future__ import annotations

import errno
from types import SimpleNamespace

from lomar.train.run_lock import RunLock
from lomar.train.run_state import prepare_run_folder


def test_a_run_without_its_folders_lock_names_the_temporaries_it_keeps(tmp_path, caplog, monkeypatch):
    """Unlocked, the run removes no temporary (one may be a live writer's on another machine): it says which stay and
    when they may go (the lock's warning speaks of a second run, not of them)."""
    def no_flock(handle, flags):
        raise OSError(errno.ENOLCK, "No locks available")

    names = [f".last.pt.tmp-4242-{'0a' * 8}", "checkpoint-000009.dcp.tmp"]
    (tmp_path / names[0]).write_bytes(b"half")
    (tmp_path / names[1]).mkdir()
    monkeypatch.setattr("fcntl.flock", no_flock)
    with caplog.at_level("WARNING", "lomar.train"), RunLock(tmp_path):
        config = SimpleNamespace(out=str(tmp_path), resume=None, overwrite=False, dump=lambda: "out: run\n")
        task = SimpleNamespace(name="toy", eval_log="knn.jsonl", outputs=(), final_outputs=())
        prepare_run_folder(config, task, None, 0, 0)
    assert (f"kept 2 temporary file(s) in {tmp_path}, e.g. {names[0]}: without a file lock there a killed writer's "
            f"cannot be told from a live one's") in caplog.text
    assert {p.name for p in tmp_path.iterdir()} >= set(names)
