"""The shared run lifecycle (lomar.train.lifecycle) driving a toy Task: its steps, losses and evaluations, the
lines it prints, one host read of the loss per optimizer step, and the two named pretraining regimes."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from toy_run import ToyConfig, ToyTask, _losses

from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.data.samplers import EpochSampler
from lomar.train.lifecycle import run


def test_a_toy_task_trains_evaluates_and_resumes_exactly(tmp_path, capsys):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert run(ToyConfig(out=str(straight)), ToyTask) == 0
    printed = capsys.readouterr().out
    # 32 points, batch 4 x accum 2: 4 steps an epoch, 12 in all
    assert "lomar toy: 32 images, Linear" in printed and "12 steps (4 an epoch" in printed
    assert "device cpu, precision fp32" in printed and printed.rstrip().splitlines()[-1].startswith("lomar toy: done")
    assert "mean of the last 10 logged steps" in printed and "unreadable" not in printed
    assert (straight / "finished").read_text() == "yes" and (straight / "tb").is_dir()
    best = safe_load(straight / "best.pt")
    assert "optimizer" not in best and best["metrics"]["score"] <= 0
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "score" in r] == [1, 2, 3]
    assert run(ToyConfig(out=str(resumed), max_steps=6), ToyTask) == 0  # stops mid-epoch 1
    mid = safe_load(resumed / "last.pt")
    assert (mid["step"], mid["epoch"], mid["batches_done"]) == (6, 1, 4)
    assert run(ToyConfig(out=str(resumed), resume="auto"), ToyTask) == 0
    a, b = safe_load(straight / "last.pt"), safe_load(resumed / "last.pt")
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (12, 3)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)
    assert _losses(straight) == _losses(resumed) and len(_losses(resumed)) == 12
    assert b["best_score"] == a["best_score"]


def test_an_evaluation_line_names_its_epoch_as_the_step_lines_do(tmp_path, capsys):
    """The step lines count epochs from 0 ('step 4/12 epoch 0'); the evaluation after that step said 'epoch 1 step 4'
    (the epochs done, as the record keeps them), so one step was in two epochs on one screen (pretrain's k-NN,
    detect, segment; finetune's record keeps the index and said 'epoch 0'). A mid-epoch evaluation names its epoch."""
    class IndexedToy(ToyTask):  # finetune's record: the epoch's 0-based index
        eval_epoch_index = True

    assert run(ToyConfig(out=str(tmp_path / "a"), max_steps=6, schedule_steps=12), ToyTask) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "step 4/6 epoch 0 " in lines[lines.index(next(ln for ln in lines if ln.startswith("step 4, "))) - 1]
    assert [ln.split(":")[0] for ln in lines if ln.startswith("step ") and ": " in ln] == [
        "step 4, end of epoch 0", "step 6, epoch 1"]
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "score" in r] == [1, 1]  # the record's counts are unchanged
    assert run(ToyConfig(out=str(tmp_path / "b"), epochs=2), IndexedToy) == 0
    said = [ln.split(":")[0] for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ") and ": " in ln]
    assert said == ["step 4, end of epoch 0", "step 8, end of epoch 1"]
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "score" in r] == [0, 1]


class Recording(ToyTask):
    """Records each batch's inputs and how often it opens its batches; 36 points in batches of 4 x accum 2:
    an epoch is 4 steps (32 points), and the 9th batch is left out."""

    def __init__(self, config, info, device):
        super().__init__(config, info, device)
        x = torch.randn(36, 3, generator=torch.Generator().manual_seed(2))
        self.data = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5]))
        sampler = EpochSampler(len(self.data), config.seed, info.rank, info.world_size, keys=False)
        self.train_loader = DataLoader(self.data, config.batch_size, sampler=sampler, drop_last=True)
        self.seen, self.opened = [], 0

    def batches(self):
        self.opened += 1
        return super().batches()

    def loss(self, batch):
        self.seen.append(batch[0].clone())
        return super().loss(batch)


def test_one_loader_iterator_serves_every_epoch_with_the_same_batches(tmp_path):
    tasks = {}

    def task(name, per_epoch=False):
        class Task_(Recording):
            def __init__(self, *args):
                super().__init__(*args)
                tasks[name] = self

            def set_epoch(self, epoch, skip_batches, epochs=1, batches=None):  # a loader that cannot span
                return super().set_epoch(epoch, skip_batches, 1 if per_epoch else epochs, batches)
        return Task_

    assert run(ToyConfig(out=str(tmp_path / "a")), task("spanning")) == 0
    assert run(ToyConfig(out=str(tmp_path / "b")), task("per_epoch", per_epoch=True)) == 0
    spanning, per_epoch = tasks["spanning"], tasks["per_epoch"]
    assert (spanning.opened, per_epoch.opened) == (1, 3)
    assert len(spanning.seen) == len(per_epoch.seen) == 3 * 8
    assert all(torch.equal(a, b) for a, b in zip(spanning.seen, per_epoch.seen))
    # stopped mid-epoch and resumed: the rest of that epoch, then the next ones, from one new iterator
    assert run(ToyConfig(out=str(tmp_path / "c"), max_steps=6), task("first")) == 0
    assert run(ToyConfig(out=str(tmp_path / "c"), resume="auto"), task("rest")) == 0
    assert tasks["rest"].opened == 1
    assert all(torch.equal(a, b) for a, b in zip(tasks["first"].seen + tasks["rest"].seen, spanning.seen))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "c")


def test_the_loss_is_read_from_the_device_once_per_optimizer_step(tmp_path, monkeypatch):
    class Quiet(ToyTask):
        def evaluate(self):  # its own reads are not the loop's
            return {}

    reads = []
    for name in ("tolist", "item", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, real=real: reads.append(1) or real(self))
    counts = []
    for batch, accum in ((8, 1), (2, 4)):  # 4 optimizer steps each, of 4 and 16 micro-batches
        assert run(ToyConfig(out=str(tmp_path / f"run{accum}"), epochs=1, accum_steps=accum, batch_size=batch,
                             warmup_epochs=0), Quiet) == 0
        counts.append(len(reads))
        reads.clear()
    monkeypatch.undo()
    assert counts[0] == counts[1] >= 4  # one read per optimizer step (+ the sampler's), none per micro-batch


class Regularised(ToyTask):
    """A loss of two parts, logged apart."""

    loss_parts = ("fit", "l2")

    def loss(self, batch):
        return {"fit": super().loss(batch), "l2": 0.1 * self.model.weight.pow(2).sum()}


def test_loss_parts_are_logged_with_the_loss_their_sum(tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert run(ToyConfig(out=str(straight)), Regularised) == 0
    records = [r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(records) == 12 and list(records[0])[:5] == ["step", "epoch", "loss", "fit", "l2"]
    for r in records:  # step means over the 2 micro-batches of each step
        assert r["loss"] == pytest.approx(r["fit"] + r["l2"], rel=1e-6) and r["l2"] > 0
    assert run(ToyConfig(out=str(resumed), max_steps=6), Regularised) == 0
    assert run(ToyConfig(out=str(resumed), resume="auto"), Regularised) == 0
    assert _losses(resumed) == _losses(straight)


def test_step_metrics_are_logged_beside_the_loss_and_not_learned_from(tmp_path):
    class Scored(ToyTask):
        step_metrics = ("score",)

        def loss(self, batch):
            fit = super().loss(batch)
            return {"loss": fit, "score": 100 + fit.detach()}

    assert run(ToyConfig(out=str(tmp_path / "plain")), ToyTask) == 0
    assert run(ToyConfig(out=str(tmp_path / "scored")), Scored) == 0
    records = [r for r in map(json.loads, (tmp_path / "scored" / "metrics.jsonl").read_text().splitlines())
               if "loss" in r]
    assert len(records) == 12 and all(r["score"] == pytest.approx(100 + r["loss"], rel=1e-6) for r in records)
    assert _losses(tmp_path / "scored") == _losses(tmp_path / "plain")


def test_loss_parts_other_than_the_declared_ones_are_refused(tmp_path):
    class Undeclared(Regularised):
        loss_parts = ("fit",)

    with pytest.raises(ValueError, match=r"the toy loss has parts \['fit', 'l2'\], not its declared loss_parts"):
        run(ToyConfig(out=str(tmp_path / "run")), Undeclared)


def test_a_non_finite_loss_names_the_step(tmp_path):
    from lomar.train.task import TrainingError

    class Exploding(ToyTask):
        def loss(self, batch):
            return super().loss(batch) * (float("nan") if self.progress.step == 2 else 1.0)

    with pytest.raises(TrainingError, match="loss is nan at step 3"):
        run(ToyConfig(out=str(tmp_path / "run")), Exploding)
    assert not (tmp_path / "run" / "last.pt").exists()  # the first checkpoint is due at step 4


def test_a_non_finite_loss_suggests_only_flags_the_command_has():
    from lomar.train.config import PretrainConfig
    from lomar.train.divergence import steadier
    from lomar.train.finetune_config import FinetuneConfig
    from lomar.train.segment_config import SegmentConfig

    assert steadier(PretrainConfig) == "lower --blr/--lr, set --clip-grad or use --precision fp32"
    assert steadier(FinetuneConfig) == "lower --blr, set --clip-grad or use --precision fp32"  # no --lr
    assert steadier(SegmentConfig) == "lower --lr, set --clip-grad or use --precision fp32"
    # nothing the run already does: an fp32 run is not told to use fp32, a clipped one to set --clip-grad
    assert steadier(FinetuneConfig(), "fp32") == "lower --blr or set --clip-grad"
    assert steadier(PretrainConfig(clip_grad=3.0), "bf16") == ("lower --blr/--lr, lower --clip-grad (now 3) or use "
                                                               "--precision fp32")


def test_a_non_finite_fp32_loss_is_not_told_to_use_fp32(tmp_path):
    from lomar.train.task import TrainingError

    class Diverging(ToyTask):
        def loss(self, batch):
            return super().loss(batch) * (float("inf") if self.progress.step else 1.0)  # step 1's: test_diverged

    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step 2 .*; lower --blr$"):
        run(ToyConfig(out=str(tmp_path / "run")), Diverging)


def test_the_regime_is_named_and_the_demo_names_the_model_it_trains(tmp_path, capsys):
    import yaml

    assert main(["pretrain", "--out", str(tmp_path / "d"), "--print-config"]) == 0
    demo = yaml.safe_load(capsys.readouterr().out)
    assert demo["preset"] == "demo" and demo["model"] == "vit_mini_patch8"
    from lomar.models.vit import model_config

    named = model_config(demo["model"])
    assert (named.embed_dim, named.depth, named.num_heads) == (demo["embed_dim"], demo["depth"], demo["num_heads"])
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "p"), "--print-config"]) == 0
    paper = yaml.safe_load(capsys.readouterr().out)
    assert paper["preset"] == "paper" and paper["model"] == "vit_base_patch16" and paper["embed_dim"] is None
    assert main(["pretrain", "--preset", "demo", "--data", str(tmp_path), "--out", str(tmp_path / "q"),
                 "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"] == "vit_mini_patch8"


def test_a_loader_that_runs_short_of_an_epoch_is_an_error_not_a_loop(tmp_path):
    class Short(ToyTask):
        def batches(self):  # one batch fewer than the epoch's 8 (32 points, batch 4)
            return iter(list(super().batches())[:7])

    with pytest.raises(ValueError, match="gave 6 of the 8 batches of epoch 0 .* lower --workers"):
        run(ToyConfig(out=str(tmp_path / "run")), Short)


def test_a_resumed_run_hides_what_a_killed_one_logged_to_tensorboard_past_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    run(ToyConfig(out=str(out), max_steps=4), ToyTask)
    with SummaryWriter(str(out / "tb")) as killed:  # steps 5-6 of a run killed before its next checkpoint
        for step in (5, 6):
            killed.add_scalar("train/loss", 99.0, step)
    run(ToyConfig(out=str(out), max_steps=8, resume="auto"), ToyTask)
    logged = EventAccumulator(str(out / "tb"))
    logged.Reload()
    steps = [(event.step, event.value) for event in logged.Scalars("train/loss")]
    assert [step for step, _ in steps] == list(range(1, 9)) and 99.0 not in [value for _, value in steps]


def test_a_one_step_run_says_1_step(tmp_path, capsys):
    assert run(ToyConfig(out=str(tmp_path / "one"), max_steps=1, warmup_epochs=0), ToyTask) == 0
    assert "; 1 step (4 an epoch" in capsys.readouterr().out
