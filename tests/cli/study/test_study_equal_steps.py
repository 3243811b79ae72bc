"""The equal-steps comparison of a study whose grid grew: each cell once, at the new slowest cell's step count."""

import json

import pytest

from helpers import write_images
from lomar.cli.study import results, runner
from lomar.cli.study.runner import run_study
from lomar.cli.study.spec import parse_spec

TINY = dict(model="vit_tiny_patch8", embed_dim=32, depth=2, num_heads=2, img_size=32, window_size=3, windows=2,
            workers=0, threads=1, device="cpu", precision="fp32", warmup_epochs=0.5)


def _record(name: str, setting: str, point: str, step: int) -> dict:
    return {"cell": name, "run": name, "setting": setting, "labels": {}, "seed": 0, "random_init": False,
            "point": point, "step": step, "train_seconds": 0.1 * step, "wall_seconds": 1.0, "slices": 1,
            "load_1min": None, "train_loss": 1.0 + step, "heldout_loss": 0.5 + step, "evaluated_at": 1.0}


def _cell(out, folder: str, setting: str, points: dict[str, tuple[str, int]]) -> None:
    """A finished cell's study state, as the study leaves it (no spec recorded: nothing to compare)."""
    (out / "cells" / folder).mkdir(parents=True)
    state = {"points": {key: _record(folder, setting, point, step) for key, (point, step) in points.items()},
             "slices": 1, "wall_seconds": 1.0, "loads": [], "cell": folder}
    (out / "cells" / folder / "study-state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("equal_steps", [True, False])
def test_a_grown_grid_compares_each_cell_once_at_the_new_slowest_step(tmp_path, monkeypatch, equal_steps):
    """Batch 4 and 6 on 12 images, one epoch each: 3 and 2 steps, so batch 6's end record was the equal-steps one
    (N = 2). Batch 12 added: 1 step, N = 1, and batch 6's record at step 2 is no longer at equal steps. It stayed in
    its state and was shown beside its copy at step 1 (one seed shown as two, 'steps 2, 1'), and with
    eval.equal_steps turned off it was still shown alone."""
    for label in ("a", "b"):
        write_images(tmp_path / "data" / "train" / label, 6, size=(32, 32))
        write_images(tmp_path / "data" / "val" / label, 2, size=(32, 32))
    out = tmp_path / "study"
    _cell(out, "batch_size-4_seed0", "batch_size=4", {"end": ("end", 3)})
    _cell(out, "batch_size-4_seed0@2steps", "batch_size=4", {"end": ("equal_steps", 2)})
    _cell(out, "batch_size-6_seed0", "batch_size=6", {"end": ("end", 2), "equal_steps": ("equal_steps", 2)})
    _cell(out, "batch_size-12_seed0", "batch_size=12", {"end": ("end", 1)})
    _cell(out, "batch_size-4_seed0@1steps", "batch_size=4", {"end": ("equal_steps", 1)})
    _cell(out, "batch_size-6_seed0@1steps", "batch_size=6", {"end": ("equal_steps", 1)})
    monkeypatch.setattr(runner, "pretrain", lambda config: pytest.fail(f"trained {config.out}"))
    monkeypatch.setattr(results, "write_figures", lambda records, spec, out: [])
    data = {split: str(tmp_path / "data" / split) for split in ("train", "val")}
    spec = parse_spec(dict(name="grown", budget="1epochs", settings=TINY, grid={"batch_size": [4, 6, 12]},
                           data={"pretrain": data["train"], **data},
                           eval={"metrics": ["heldout_loss"], "equal_steps": equal_steps}))
    records = run_study(spec, out, log=lambda line: None)
    equal = [(r["setting"], r["step"]) for r in records if r["point"] == "equal_steps"]  # the slowest cell came first
    assert equal == ([("batch_size=4", 1), ("batch_size=6", 1), ("batch_size=12", 1)] if equal_steps else [])
    assert sorted((r["setting"], r["step"]) for r in records if r["point"] == "end") == \
        [("batch_size=12", 1), ("batch_size=4", 3), ("batch_size=6", 2)]
    table = (out / "results.md").read_text()
    assert ("## At equal pretraining steps (1: the slowest cell's count)" in table) == equal_steps
    assert "| 2, 1 |" not in table
