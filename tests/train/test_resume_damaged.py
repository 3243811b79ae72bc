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
