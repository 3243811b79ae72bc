"""Numerics of the lifecycle (its toy Task): a non-finite loss stops the run before the update, weights gone
non-finite are never saved over the last good checkpoint nor resumed, clipping bounds the whole accumulated
unscaled gradient, and each step's record holds its micro-batches' mean loss and the lr it applied."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from toy_run import ToyConfig, ToyTask, run_two_ranks

from lomar.checkpoints.io import safe_load
from lomar.errors import UsageError
from lomar.train import lifecycle
from lomar.train.lifecycle import run
from lomar.train.monitor import Monitor
from lomar.train.task import TrainingError


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in state.values())


def test_a_finite_loss_whose_gradient_is_not_never_overwrites_the_last_good_checkpoint(tmp_path, monkeypatch):
    class NanGradient(ToyTask):  # 0 * sqrt(0): a loss of 0 more, a gradient of NaN
        def loss(self, batch):
            extra = 0.0 * (self.model.weight - self.model.weight.detach()).sum().sqrt()
            return super().loss(batch) + (extra if self.progress.step == 7 else 0.0)

    out = tmp_path / "run"  # 4 steps an epoch, a checkpoint at each epoch's end: step 8's holds the NaN update
    expected = (r"^weight weight holds NaN or inf after the update of step 8, whose loss was finite; not saved; "
                r"the last good checkpoint is .*last\.pt; lower --blr$")
    monitors = []  # the run's log: a run stopped by an error left its metrics.jsonl open (a ResourceWarning later)
    monkeypatch.setattr(lifecycle, "Monitor", lambda *args: monitors.append(Monitor(*args)) or monitors[-1])
    with pytest.raises(TrainingError, match=expected):
        run(ToyConfig(out=str(out)), NanGradient)
    assert [m.file.closed for m in monitors] == [True]
    last = safe_load(out / "last.pt")
    assert last["step"] == 4 and _finite(last["model"]) and _finite(safe_load(out / "best.pt")["model"])
    scored = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "score" in r]
    assert scored == [4]  # step 8's weights were not scored either (a NaN score, or k-NN's top-1 of NaN features)


def test_an_fp16_run_whose_steps_all_overflow_stops_and_each_record_holds_its_loss_scale(tmp_path):
    # GradScaler skips such a step and halves its scale: the loss stays finite, the weights unchanged, and the run
    # went on for as long as it was set to, learning nothing
    def overflowing(steps):
        class Overflowing(ToyTask):  # over ``steps``, a loss of 0 more and a gradient of NaN
            def loss(self, batch):
                extra = 0.0 * (self.model.weight - self.model.weight.detach()).sum().sqrt()
                small = 1e-3 * super().loss(batch)  # no overflow of its own at fp16's first scale, 2**16
                return small + (extra if self.progress.step in steps else 0.0)
        return Overflowing

    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"^fp16: the gradients of the 30 steps before step 33 all overflowed, so "
                                            r"none was applied \(the loss scale fell to 6\.10352e-05\); the last good "
                                            r"checkpoint is .*last\.pt; lower --blr or use --precision fp32$"):
        run(ToyConfig(out=str(out), precision="fp16", epochs=20), overflowing(range(2, 80)))
    scales = [r["loss_scale"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert scales == [2.0 ** 16] * 3 + [2.0 ** (15 - i) for i in range(29)]  # step 33's record was not written
    assert safe_load(out / "last.pt")["step"] == 32  # the skipped steps changed no weight: its checkpoints stand
    survived = tmp_path / "survived"  # one skipped step fewer in a row: the run recovers and ends
    assert run(ToyConfig(out=str(survived), precision="fp16", epochs=10), overflowing(range(2, 31))) == 0
    fp32 = tmp_path / "fp32"
    assert run(ToyConfig(out=str(fp32), max_steps=2), ToyTask) == 0
    assert all("loss_scale" not in line for line in (fp32 / "metrics.jsonl").read_text().splitlines())


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


@pytest.mark.parametrize("precision, fix", [("fp32", "the data"), ("bf16", "the data, or use --precision fp32")])
def test_a_non_finite_loss_before_any_update_is_not_blamed_on_the_lr(tmp_path, precision, fix):
    # BEiT's --layer-scale-init 1e30 gave "loss is nan at step 1; ... lower --blr/--lr or lower --clip-grad"
    class Broken(ToyTask):
        def loss(self, batch):
            return super().loss(batch) * float("inf")

    with pytest.raises(TrainingError, match=rf"^loss is (nan|inf) at step 1 \(epoch 0\), before any update \(not the "
                                            rf"lr's doing\); no checkpoint was written yet; check .*{fix}$"):
        run(ToyConfig(out=str(tmp_path / "run"), precision=precision), Broken)


def test_a_checkpoint_with_non_finite_weights_is_not_resumed(tmp_path):
    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=4), ToyTask) == 0
    state = safe_load(out / "last.pt")
    state["model"]["weight"][0, 1] = float("nan")  # as a version without the check saved after a NaN update
    torch.save(state, out / "last.pt")
    built = []

    class Built(ToyTask):
        def __init__(self, *args):
            built.append(self)
            super().__init__(*args)

    with pytest.raises(UsageError, match=r"last\.pt: its weight weight holds NaN or inf .*; pass --resume "
                                         r"\S+/checkpoint-N\.pt --overwrite \(an earlier one\), or another --out$"):
        run(ToyConfig(out=str(out), resume="auto"), Built)
    assert built == []  # refused before the run was built: a ViT-B's build and its data's listing (2.5 s on a CPU)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clipping_bounds_the_whole_accumulated_unscaled_gradient(tmp_path, precision):
    # clipped per micro-batch, or before fp16's loss scale is taken out, the gradient the optimizer
    # applies would not have the norm --clip-grad names
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    @dataclasses.dataclass
    class Clipped(ToyConfig):
        clip_grad: float | None = 0.01

    def applied(optimizer, *_):  # the fused AdamW takes the loss scale and the overflow flag from the GradScaler
        grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"]]
        norm = torch.linalg.vector_norm(torch.cat(grads))
        scale, skipped = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
        if skipped is None or not float(skipped):  # fp16: a step whose scaled gradient overflowed is skipped
            norms.append(float(norm / (1.0 if scale is None else scale)))

    norms = []
    hook = register_optimizer_step_pre_hook(applied)
    try:
        assert run(Clipped(out=str(tmp_path / "run"), precision=precision, epochs=1), ToyTask) == 0  # accum 2
    finally:
        hook.remove()
    assert len(norms) >= 2 and norms == pytest.approx([0.01] * len(norms), rel=1e-3)
    last = safe_load(tmp_path / "run" / "last.pt")
    assert _finite(last["model"]) and (precision == "fp32" or last["scaler"]["scale"] < 2.0 ** 16)


def test_each_steps_record_holds_the_mean_of_its_micro_batches_and_the_lr_it_applied(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lomar.lr_schedule import lr_at

    micro = []

    class Recording(ToyTask):
        def loss(self, batch):
            loss = super().loss(batch)
            micro.append(float(loss.detach()))
            return loss

    out = tmp_path / "run"  # 32 points, batch 4 x accum 2: 4 steps an epoch, 12 in all, warm-up 4 steps
    assert run(ToyConfig(out=str(out), blr=0.5), Recording) == 0
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["loss"] for r in records] == pytest.approx([(a + b) / 2 for a, b in zip(micro[::2], micro[1::2])])
    peak = 0.5 * 4 * 2 / 256
    assert [r["lr"] for r in records] == pytest.approx([lr_at(s, 12, 4, peak) for s in range(12)])
    scalars = EventAccumulator(str(out / "tb")).Reload().Scalars
    for key in ("loss", "lr"):  # TensorBoard keeps float32
        events = scalars(f"train/{key}")
        assert [e.step for e in events] == list(range(1, 13))
        assert [e.value for e in events] == pytest.approx([r[key] for r in records], rel=1e-6)


class ScoredOnMainOnly(ToyTask):
    """Scores on the main process alone, as pretraining's k-NN does (no best.pt either): the others' evaluate gives
    nothing."""

    best_metric = None

    def evaluate(self):
        return super().evaluate() if torch.distributed.get_rank() == 0 else {}


@pytest.mark.slow
def test_the_weights_check_before_an_evaluation_is_joined_by_every_rank(tmp_path):
    # The end of the last epoch and the end of the run evaluate the same step: the main rank, having scored it,
    # skips the second; a check (a collective) made only by the ranks that go on would wait for it forever.
    run_two_ranks(ScoredOnMainOnly, tmp_path, "the ranks' collectives went out of step at the end of the run",
                  epochs=1)
    assert safe_load(tmp_path / "last.pt")["step"] == 4 and '"score"' in (tmp_path / "metrics.jsonl").read_text()


class FailsToScoreOnMain(ToyTask):
    """The main process's scoring data fail at the first epoch's end, as k-NN's can; the others score nothing."""

    best_metric = None

    def evaluate(self):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return {}
        raise TrainingError("no image of the k-NN data could be read; fix or replace them")


def test_an_evaluation_that_fails_on_its_data_keeps_what_the_run_trained(tmp_path):
    with pytest.raises(TrainingError, match="no image of the k-NN data could be read"):
        run(ToyConfig(out=str(tmp_path / "run")), FailsToScoreOnMain)
    assert safe_load(tmp_path / "run" / "last.pt")["step"] == 4


@pytest.mark.slow
def test_an_evaluation_that_fails_on_the_main_rank_alone_keeps_what_the_run_trained(tmp_path):
    # under DDP every rank joins the save before the main rank's error: the epoch's 4 steps are kept
    raised = run_two_ranks(FailsToScoreOnMain, tmp_path, "the other rank waited for the failed one", errors=True,
                           epochs=2)
    assert raised == ["TrainingError: no image of the k-NN data could be read; fix or replace them",
                      "TrainingError: another process's evaluation failed; see its error"]
    assert safe_load(tmp_path / "last.pt")["step"] == 4
