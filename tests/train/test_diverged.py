"""A run that diverges (the lifecycle's toy Task): a non-finite loss stops it before the update, weights gone
non-finite are never saved over the last good checkpoint, and such a checkpoint is not resumed."""

from __future__ import annotations

import pytest
import torch
from test_lifecycle import ToyConfig, ToyTask

from lomar.checkpoints.io import safe_load
from lomar.errors import UsageError
from lomar.train.lifecycle import TrainingError, run


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in state.values())


def test_a_finite_loss_whose_gradient_is_not_never_overwrites_the_last_good_checkpoint(tmp_path):
    class NanGradient(ToyTask):  # 0 * sqrt(0): a loss of 0 more, a gradient of NaN
        def loss(self, batch):
            extra = 0.0 * (self.model.weight - self.model.weight.detach()).sum().sqrt()
            return super().loss(batch) + (extra if self.progress.step == 7 else 0.0)

    out = tmp_path / "run"  # 4 steps an epoch, a checkpoint at each epoch's end: step 8's holds the NaN update
    expected = (r"^weight weight holds NaN or inf after the update of step 8, whose loss was finite; not saved; "
                r"the last good checkpoint is .*last\.pt; lower --blr$")
    with pytest.raises(TrainingError, match=expected):
        run(ToyConfig(out=str(out)), NanGradient)
    last = safe_load(out / "last.pt")
    assert last["step"] == 4 and _finite(last["model"]) and _finite(safe_load(out / "best.pt")["model"])


def test_a_non_finite_loss_stops_the_run_before_its_update(tmp_path):
    tasks = []

    class Exploding(ToyTask):
        def __init__(self, *args):
            super().__init__(*args)
            tasks.append(self)

        def loss(self, batch):
            return super().loss(batch) * (float("inf") if self.progress.step == 5 else 1.0)

    with pytest.raises(TrainingError, match=r"^loss is (nan|inf) at step 6 \(epoch 1\); the last good checkpoint"):
        run(ToyConfig(out=str(tmp_path / "run")), Exploding)
    assert _finite(tasks[0].model.state_dict())  # what a caller that catches the error would save


def test_a_checkpoint_with_non_finite_weights_is_not_resumed(tmp_path):
    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=4), ToyTask) == 0
    state = safe_load(out / "last.pt")
    state["model"]["weight"][0, 1] = float("nan")  # as a version without the check saved after a NaN update
    torch.save(state, out / "last.pt")
    with pytest.raises(UsageError, match=r"last\.pt: its weight weight holds NaN or inf .*earlier checkpoint"):
        run(ToyConfig(out=str(out), resume="auto"), ToyTask)
