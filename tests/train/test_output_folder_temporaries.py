"""A writer killed inside a task's output folder (segment's ``predictions/``, written an image at a time) leaves its
temporary there: the resume removes it as it does those in the run folder itself, never through a link."""

from __future__ import annotations

from types import SimpleNamespace

from lomar.train.run_lock import RunLock
from lomar.train.run_state import prepare_run_folder
from lomar.train.segment import SegmentTask

_HALF = f".val_00003.png.tmp-4242-{'0a' * 8}"  # atomic_write's own name: the segment run killed mid-write


def _resume(out, step=3):
    config = SimpleNamespace(out=str(out), resume="auto", overwrite=False, dump=lambda: "out: run\n")
    task = SimpleNamespace(name="segment", eval_log="metrics.jsonl", outputs=SegmentTask.outputs, final_outputs=(),
                           best_metric=SegmentTask.best_metric)
    with RunLock(out):
        prepare_run_folder(config, task, out / "last.pt", step, 1)


def test_a_resumed_segment_run_removes_a_killed_prediction_write(tmp_path, capsys):
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    for name in ("val_00000.png", "val_00003.png", _HALF):
        (predictions / name).write_bytes(b"png")
    (tmp_path / "last.pt").write_bytes(b"x")
    _resume(tmp_path)
    assert sorted(p.name for p in predictions.iterdir()) == ["val_00000.png", "val_00003.png"]
    assert f"removed 1 stale temporary file(s) in {tmp_path}, e.g. predictions/{_HALF}" in capsys.readouterr().err


def test_an_output_folder_that_is_a_link_is_not_cleaned_through(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / _HALF).write_bytes(b"png")
    out = tmp_path / "run"
    out.mkdir()
    (out / "predictions").symlink_to(elsewhere)
    (out / "last.pt").write_bytes(b"x")
    _resume(out)
    assert (elsewhere / _HALF).exists()
