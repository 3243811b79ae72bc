"""--resume from a checkpoint whose counts are damaged or crafted: one line, never a traceback or a negative step."""

from __future__ import annotations

import pytest
import torch

from helpers import pretrain


@pytest.mark.parametrize("step", ["x", -5, 2.5])
def test_resume_refuses_a_checkpoint_whose_step_is_not_a_count(tmp_path, pretrained, step, capsys):
    """step 'x' stopped the run with a TypeError's traceback; step -5 trained on from step -4."""
    ckpt = torch.load(pretrained, weights_only=True)
    ckpt["step"] = step
    torch.save(ckpt, tmp_path / "crafted.pt")
    capsys.readouterr()
    assert pretrain("--resume", str(tmp_path / "crafted.pt"), "--out", str(tmp_path / "run"), "--max-steps", "2") == 2
    err = capsys.readouterr().err
    assert f"crafted.pt holds {{'step': {step!r}, " in err and "not counts of steps; the file is damaged" in err
    assert err.count("\n") == 1


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A run folder of two sharded checkpoints (steps 3 and 5; last.json names 5), built once in one process."""
    import torch.distributed.checkpoint as dcp

    from lomar.checkpoints.io import atomic_save

    out = tmp_path_factory.mktemp("sharded_run")
    for step in (3, 5):
        folder = out / f"checkpoint-{step:06d}.dcp"
        dcp.save({"model": {"w": torch.full((64,), float(step))}, "optimizer": {"m": torch.zeros(64)}},
                 checkpoint_id=str(folder), no_dist=True)
        atomic_save({"step": step, "epoch": 0, "batches_done": step}, folder / "meta.pt")
    (out / "last.json").write_text('{"checkpoint": "checkpoint-000005.dcp", "step": 5}\n')
    return out


@pytest.mark.parametrize("how", ["cut short", "missing", "empty"])
def test_resume_auto_passes_over_a_sharded_last_whose_data_file_is_damaged(tmp_path, sharded_run, how):
    """As a last.pt that cannot be read is skipped for the newest older intact checkpoint, a last.json folder whose
    data file is cut, removed or emptied: it was chosen, and its load ended in DCP's traceback."""
    import shutil

    from lomar.train.run_resume import find_resume_point

    out = tmp_path / "run"
    shutil.copytree(sharded_run, out)
    [data_file] = (out / "checkpoint-000005.dcp").glob("*.distcp")
    if how == "missing":
        data_file.unlink()
    else:
        data_file.write_bytes(data_file.read_bytes()[:40] if how == "cut short" else b"")
    found = find_resume_point(out)
    assert found.path == out / "checkpoint-000003.dcp" and found.step == 3
    assert found.notes[0] == f"{out / 'last.json'} names no intact checkpoint, skipped"
    assert found.notes[-1] == f"resuming from the newest intact checkpoint, {out / 'checkpoint-000003.dcp'}"
    assert find_resume_point(sharded_run).path == sharded_run / "checkpoint-000005.dcp"  # intact: taken
