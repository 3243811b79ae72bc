"""The temporaries a killed writer leaves in a run folder: removed under the folder's lock, and only those no live
writer (an unlocked run elsewhere, an export into the folder) may still be writing."""

from __future__ import annotations

from types import SimpleNamespace

from helpers import no_flock
from lomar.checkpoints.export_leftovers import export_lock
from lomar.train.run_lock import RunLock
from lomar.train.run_state import prepare_run_folder, remove_stale_temporaries


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    names = [".checkpoint-000009.pt.tmp-4242", ".last.pt.tmp-99999", ".metrics.jsonl.tmp", ".config.yaml.tmp",
             f".last.pt.tmp-4242-{'0a' * 8}"]  # atomic_write's own name: a writer killed mid-write
    for name in names:
        (tmp_path / name).write_bytes(b"half")
    keep = ["last.pt", "checkpoint-000009.pt", "notes.tmp.txt", ".lock"]
    for name in keep:  # .lock: a killed run's (a file of the user's of that name is refused)
        (tmp_path / name).write_bytes(b"pid 4242 on elsewhere" if name == ".lock" else b"x")
    with RunLock(tmp_path):
        removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_a_run_without_its_folders_lock_removes_no_temporary(tmp_path, monkeypatch, caplog):
    """A filesystem without flock (a share mounted without it): the run goes on unlocked, and a temporary there may be
    a live writer's on another machine, whose PID says nothing here: it stays."""
    names = [f".last.pt.tmp-4242-{'0a' * 8}", ".checkpoint-000009.pt.tmp-4242"]
    for name in names:
        (tmp_path / name).write_bytes(b"half")
    no_flock(monkeypatch)
    with caplog.at_level("WARNING", "lomar.train"), RunLock(tmp_path):
        assert remove_stale_temporaries(tmp_path) == []
    assert "no file lock there" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_a_run_without_its_folders_lock_names_the_temporaries_it_keeps(tmp_path, caplog, monkeypatch):
    """Unlocked, the run removes no temporary (one may be a live writer's on another machine): it says which stay and
    when they may go (the lock's warning speaks of a second run, not of them)."""
    names = [f".last.pt.tmp-4242-{'0a' * 8}", "checkpoint-000009.dcp.tmp"]
    (tmp_path / names[0]).write_bytes(b"half")
    (tmp_path / names[1]).mkdir()
    no_flock(monkeypatch)
    with caplog.at_level("WARNING", "lomar.train"), RunLock(tmp_path):
        config = SimpleNamespace(out=str(tmp_path), resume=None, overwrite=False, dump=lambda: "out: run\n")
        task = SimpleNamespace(name="toy", eval_log="knn.jsonl", outputs=(), final_outputs=())
        prepare_run_folder(config, task, None, 0, 0)
    assert (f"kept 2 temporary file(s) in {tmp_path}, e.g. {names[0]}: without a file lock there a killed writer's "
            f"cannot be told from a live one's") in caplog.text
    assert {p.name for p in tmp_path.iterdir()} >= set(names)


def test_an_export_running_into_the_folder_keeps_its_temporaries(tmp_path):
    """A ``lomar export --to RUN`` writing while the run starts: its temporaries are its, not stale."""
    names = [".config.json.tmp-4242", ".model.safetensors.tmp-4242", ".last.pt.tmp-99"]
    for name in names:
        (tmp_path / name).write_bytes(b"half")
    with RunLock(tmp_path):
        with export_lock(tmp_path) as held:
            assert held
            assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".last.pt.tmp-99"]
        assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == sorted(names[:2])  # no export: stale
