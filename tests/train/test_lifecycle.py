"""The shared run lifecycle (lomar.train.lifecycle) driving a toy Task: resume, best.pt, the lines it prints,
one host read of the loss per optimizer step, and the two named pretraining regimes."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import free_port
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.data.samplers import EpochSampler
from lomar.train.lifecycle import run
from lomar.train.precision import resolve_precision
from lomar.train.task import Task


@dataclasses.dataclass
class ToyConfig:
    COMMAND = "toy"
    out: str = ""
    resume: str | None = None
    overwrite: bool = False
    device: str = "cpu"
    seed: int = 0
    threads: int | None = 1
    epochs: int = 3
    max_steps: int | None = None
    schedule_steps: int | None = None
    warmup_epochs: float = 1
    blr: float = 0.5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 4
    accum_steps: int = 2
    precision: str = "fp32"
    log_every: int = 1
    time_limit: int | None = None


class ToyTask(Task):
    """Linear regression on ``points`` (32) fixed points; "score" rises as the loss falls."""

    name, best_metric, points = "toy", "score", 32

    def __init__(self, config: ToyConfig, info, device):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(self.points, 3, generator=gen)
        self.data = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5]))
        self.model = torch.nn.Linear(3, 1)
        sampler = EpochSampler(len(self.data), config.seed, info.rank, info.world_size, keys=False)
        self.train_loader = DataLoader(self.data, config.batch_size, sampler=sampler, drop_last=True)
        self.finished = False

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).squeeze(1), y)

    @torch.no_grad()
    def evaluate(self):
        x, y = self.data.tensors
        return {"score": -float(torch.nn.functional.mse_loss(self.model(x).squeeze(1), y))}

    def finish(self, out):
        (out / "finished").write_text("yes")


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


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


class SkippingToy(ToyTask):
    """ToyTask whose points numbered in ``bad`` are unusable files ("img{i}.png"): the run skips and counts them."""

    bad: frozenset = frozenset()

    def __init__(self, config, info, device):
        super().__init__(config, info, device)
        numbered = TensorDataset(*self.data.tensors, torch.arange(len(self.data)))
        sampler = EpochSampler(len(self.data), config.seed, info.rank, info.world_size, keys=False)
        self.train_loader = DataLoader(numbered, config.batch_size, sampler=sampler, drop_last=True)

    def skipped(self, batch):
        return [f"img{i}.png" for i in batch[2].tolist() if i in self.bad]

    def loss(self, batch):
        return super().loss(batch[:2])


def test_skips_are_counted_over_the_whole_run_across_a_stop_and_resume(tmp_path, capsys):
    """A resumed process counted only its own skips: its summary said 1 where the epoch had 3, and 2 + 2 bad files
    (over 10 % of 32 together) went through a stop that an uninterrupted run refuses."""
    from lomar.train.skipped_files import SkippedFiles
    from lomar.train.task import TrainingError

    class Three(SkippingToy):
        bad = frozenset({12, 3, 0})  # points 12 and 3 come in the epoch's first 2 steps, 0 after (seed 0's order)

    class Four(SkippingToy):
        bad = frozenset({12, 3, 0, 7})

    def last_line():
        return capsys.readouterr().out.rstrip().splitlines()[-1]

    assert run(ToyConfig(out=str(tmp_path / "a"), epochs=1), Three) == 0
    assert ", 3 unusable image(s) skipped, e.g. img" in last_line()
    assert run(ToyConfig(out=str(tmp_path / "b"), epochs=1, max_steps=2), Three) == 0
    assert ", 2 unusable image(s) skipped, e.g. img" in last_line()  # the stop splits them
    assert safe_load(tmp_path / "b" / "last.pt")["skipped_ranks"] == [["img12.png", "img3.png"]]
    assert run(ToyConfig(out=str(tmp_path / "b"), epochs=1, resume="auto"), Three) == 0
    assert ", 3 unusable image(s) skipped, e.g. img" in last_line()
    with pytest.raises(TrainingError, match="^4 images could not be used so far, over 10% of the 32 an epoch"):
        run(ToyConfig(out=str(tmp_path / "c"), epochs=1), Four)
    assert run(ToyConfig(out=str(tmp_path / "d"), epochs=1, max_steps=2), Four) == 0
    with pytest.raises(TrainingError, match="^4 images could not be used so far, over 10% of the 32 an epoch"):
        run(ToyConfig(out=str(tmp_path / "d"), epochs=1, resume="auto"), Four)
    older = SkippedFiles(8, 4, warn=False)
    older.restore(None, 0)  # a checkpoint saved before the skipped files were kept: counted from 0
    assert older.tracker.count == 0 and not older.tracker.bad


def test_a_run_that_skipped_a_detection_or_segmentation_sample_resumes(tmp_path, capsys):
    """coco's and segmentation's datasets name a skipped sample by a Skipped line (a str subclass): saved as one in
    skipped_ranks, its checkpoint was refused by torch.load(weights_only=True), so the run could not resume."""
    from lomar.data.collate import Skipped

    class Lines(SkippingToy):
        bad = frozenset({12, 3, 0})

        def skipped(self, batch):
            return [Skipped(line) for line in super().skipped(batch)]

    assert run(ToyConfig(out=str(tmp_path / "run"), epochs=1, max_steps=2), Lines) == 0
    assert safe_load(tmp_path / "run" / "last.pt")["skipped_ranks"] == [["img12.png", "img3.png"]]
    capsys.readouterr()
    assert run(ToyConfig(out=str(tmp_path / "run"), epochs=1, resume="auto"), Lines) == 0
    assert ", 3 unusable image(s) skipped, e.g. img" in capsys.readouterr().out.rstrip().splitlines()[-1]


def test_too_many_skips_are_told_in_numbers_the_user_can_check(tmp_path):
    """36 points, all unusable, in batches of 4 x accum 2: an epoch reads 32 (the 9th batch is left out). The
    message said '4 of 32 images (over 10%)', which read as 32 files in the data."""
    from lomar.train.task import TrainingError

    class AllBad(SkippingToy):
        bad = frozenset(range(36))

        def __init__(self, config, info, device):
            x = torch.randn(36, 3, generator=torch.Generator().manual_seed(2))
            sampler = EpochSampler(36, config.seed, info.rank, info.world_size, keys=False)
            self.train_loader = DataLoader(TensorDataset(x, x.sum(1), torch.arange(36)), config.batch_size,
                                           sampler=sampler, drop_last=True)
            self.model = torch.nn.Linear(3, 1)

    with pytest.raises(TrainingError) as caught:
        run(ToyConfig(out=str(tmp_path / "run")), AllBad)
    message = str(caught.value)
    assert re.fullmatch(r"4 images could not be used so far, over 10% of the 32 an epoch reads \(8 batch\(es\) of "
                        r"4 per process\), e\.g\. img\d+\.png; fix or remove them", message), message


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


def test_the_share_of_a_step_spent_waiting_for_input_is_logged_and_named(tmp_path, capsys):
    import time

    class SlowInput(ToyTask):
        def batches(self):
            for batch in super().batches():
                # A step of this toy takes well under a millisecond, but a busy CI machine has stalled one for
                # over 12 ms: the wait is long enough that the shares below hold through 50 ms stalls.
                time.sleep(0.5)
                yield batch

    assert run(ToyConfig(out=str(tmp_path / "slow"), epochs=1, accum_steps=1), SlowInput) == 0
    waits = [r["input_wait"] for r in map(json.loads, (tmp_path / "slow" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert len(waits) == 8 and all(0.8 < w <= 1 for w in waits)
    printed = capsys.readouterr()
    lines, note = printed.out.rstrip().splitlines(), printed.err.rstrip().splitlines()[-1]
    assert re.search(r"input wait (9\d|100)%", lines[1])  # the printed step lines show it too
    assert re.match(r"lomar toy: note: the input limited this run: the loop waited for batches (9\d|100)%", note)
    assert note.endswith("of a step's time (median of 7 steps); try more --workers")  # a toy has no workers
    assert lines[-1].startswith("lomar toy: done") and "input limited" not in printed.out


def test_the_input_note_needs_a_median_wait_over_the_bound():
    from lomar.train.monitor import INPUT_BOUND, input_limit_note

    def note(waits, **kwargs):
        return input_limit_note(waits, 4, **kwargs)

    assert note([0.9, 0.1, 0.1, 0.5]) is None  # the first step (workers starting) does not count
    assert note([0.0, 0.5, INPUT_BOUND, 0.1], decode="full").endswith(
        "waited for batches 20% of a step's time (median of 3 steps); try more --workers (now 4) "
        "or --decode draft (or gpu on CUDA)")
    assert "device's JPEG decoding" in note([0.0, 0.5, 0.5], decode="gpu")
    assert note([0.9]) is None and note([]) is None


def test_the_resume_hint_of_a_multi_process_run_asks_for_the_same_launch():
    """A resume checks the number of processes: a single-process command was no way to continue a torchrun run."""
    from pathlib import Path

    from lomar.train.monitor import resume_hint

    assert resume_hint("pretrain", Path("runs/a"), 1) == "Resume with: lomar pretrain --out runs/a --resume auto"
    assert resume_hint("detect", Path("r"), 8) == ("Resume with the same launch (8 processes, torchrun): "
                                                   "lomar detect --out r --resume auto")
    # a folder with a space pastes as one word
    assert resume_hint("segment", Path("my runs/a"), 1) == "Resume with: lomar segment --out 'my runs/a' --resume auto"


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


def test_a_finished_run_resumed_says_where_it_ends_and_why(tmp_path, capsys):
    assert run(ToyConfig(out=str(tmp_path / "run")), ToyTask) == 0  # 3 epochs of 4 steps
    capsys.readouterr()
    assert run(ToyConfig(out=str(tmp_path / "run"), resume="auto", max_steps=20), ToyTask) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "lomar toy: nothing to do, the run is at step 12; it ends at 12 (--max-steps 20 or --epochs 3 of 4 steps, "
        "whichever ends first)")
    assert run(ToyConfig(out=str(tmp_path / "run"), resume="auto"), ToyTask) == 0  # no --max-steps: no 'whichever'
    assert capsys.readouterr().out.splitlines()[-1] == (
        "lomar toy: nothing to do, the run is at step 12; it ends at 12 (--epochs 3 of 4 steps)")


def test_a_finished_run_resumed_leaves_its_folder_as_it_is(tmp_path):
    # "nothing to do" rewrote config.yaml (recording the resume's run-control flags) and metrics.jsonl
    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out)), ToyTask) == 0

    def files():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()
                if p.is_file() and p.name != ".lock"}

    before = files()
    assert {"config.yaml", "metrics.jsonl", "last.pt"} <= before.keys()
    assert run(ToyConfig(out=str(out), resume="auto", max_steps=20, log_every=7), ToyTask) == 0
    assert files() == before


def test_a_finished_run_resumed_answers_without_building_the_run(tmp_path, capsys):
    # it built the model and read the whole checkpoint to say "nothing to do": ~4 s for a ViT-B on 2 CPU cores
    class Counted(ToyTask):
        final_outputs, builds = ("finished",), []

        def __init__(self, config, info, device):
            super().__init__(config, info, device)
            self.builds.append(config.resume)

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=3), Counted) == 0  # mid-epoch 0: steps an epoch from the checkpoint
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), max_steps=3, resume="auto"), Counted) == 0
    assert Counted.builds == [None] and capsys.readouterr().out.splitlines()[-1] == (
        "lomar toy: nothing to do, the run is at step 3; it ends at 3 (--max-steps 3 or --epochs 3 of 4 steps, "
        "whichever ends first)")
    ckpt = safe_load(out / "last.pt")
    del ckpt["steps_per_epoch"]  # a checkpoint saved before it was kept: mid-epoch 0, only the built run can tell
    torch.save(ckpt, out / "last.pt")
    assert run(ToyConfig(out=str(out), max_steps=3, resume="auto"), Counted) == 0
    assert Counted.builds == [None, "auto"]
    assert run(ToyConfig(out=str(out), max_steps=4, resume="auto"), Counted) == 0  # epoch 1 from step 4
    del Counted.builds[:]
    ckpt = safe_load(out / "last.pt")
    del ckpt["steps_per_epoch"]  # at an epoch's end the steps done tell it
    torch.save(ckpt, out / "last.pt")
    assert run(ToyConfig(out=str(out), max_steps=4, resume="auto"), Counted) == 0
    (out / "finished").unlink()  # the end-of-run export needs the model
    assert run(ToyConfig(out=str(out), max_steps=4, resume="auto"), Counted) == 0
    assert Counted.builds == ["auto"] and (out / "finished").read_text() == "yes"


def test_a_finished_run_resumed_draws_its_missing_curves_again(tmp_path, capsys):
    # it wrote a missing export again but not a deleted loss.png, drawn from the log alone
    class Curved(ToyTask):
        curves = ("curve.txt",)

        @staticmethod
        def draw_curves(config, out):
            (out / "curve.txt").write_text(str(len(_losses(out))))

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=3), Curved) == 0
    capsys.readouterr()
    assert not (out / "curve.txt").exists()  # as if deleted: a toy draws no figures as it trains
    assert run(ToyConfig(out=str(out), max_steps=3, resume="auto"), Curved) == 0
    assert (out / "curve.txt").read_text() == "3" and "; writing its missing curve.txt" in capsys.readouterr().out


def test_a_finished_run_resumed_removes_stale_temporaries(tmp_path, capsys):
    # a run killed while writing its end-of-run files leaves a temporary (an export's: the encoder's size); the
    # resume that writes them again left it there for good
    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out)), ToyTask) == 0
    stale = out / ".encoder.safetensors.tmp-999"
    stale.write_bytes(b"x" * 100)
    assert run(ToyConfig(out=str(out), resume="auto"), ToyTask) == 0
    printed, noted = capsys.readouterr()
    assert not stale.exists() and "lomar toy: note: removed 1 stale temporary file(s)" in noted  # a note: stderr
    assert "stale" not in printed


def test_a_resume_the_task_refuses_names_its_cause_not_the_weights_shapes(tmp_path):
    # finetune resumed on data of 4 classes, not 3: "does not fit this run: size mismatch for head.weight ..."
    from lomar.errors import UsageError

    class Classes(ToyTask):
        def __init__(self, config, info, device):
            super().__init__(config, info, device)
            self.model = torch.nn.Linear(3, 1 if config.resume is None else 2)

        def state(self):
            return {"classes": ["a"]}

        def load(self, state):
            raise UsageError(f"--resume: the checkpoint's classes {state['classes']} differ from the data's")

    assert run(ToyConfig(out=str(tmp_path / "run"), max_steps=4), Classes) == 0
    with pytest.raises(UsageError, match=r"^--resume: the checkpoint's classes \['a'\] differ from the data's$"):
        run(ToyConfig(out=str(tmp_path / "run"), resume="auto"), Classes)


@pytest.mark.parametrize("settings, end, by, fix", [(dict(max_steps=5), 5, "--max-steps 5", "--max-steps 8"),
                                                    (dict(epochs=1), 4, "--epochs 1 of 4 steps", "--epochs 2")])
def test_a_resume_whose_settings_end_before_the_runs_step_is_refused(tmp_path, settings, end, by, fix):
    # it said "nothing to do" and wrote a missing export from step 8's weights as the end of a 5-step run; and it
    # built the Task (finetune's: its pretrained encoder read, the load line printed) before this settings refusal
    from lomar.errors import UsageError

    class Exporting(ToyTask):
        final_outputs, built = ("finished",), 0

        def __init__(self, config, info, device):
            type(self).built += 1
            super().__init__(config, info, device)

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=8, schedule_steps=12), Exporting) == 0
    (out / "finished").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}
    with pytest.raises(UsageError, match=rf"^--resume: the run is at step 8, past step {end} where {by} ends it, and "
                                         rf"a resume does not go back; pass {fix} or more, or resume an "
                                         rf"earlier checkpoint: --resume {out}/checkpoint-N.pt --overwrite$"):
        run(ToyConfig(out=str(out), resume="auto", schedule_steps=12, **settings), Exporting)
    assert Exporting.built == 1  # the first run's
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == kept  # config.yaml too


def test_a_resume_past_the_end_its_checkpoint_cannot_tell_is_refused_by_the_built_run(tmp_path):
    # a checkpoint without steps_per_epoch, saved mid-epoch 0: only the built run knows an epoch's length
    from lomar.errors import UsageError

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=3), ToyTask) == 0
    ckpt = safe_load(out / "last.pt")
    del ckpt["steps_per_epoch"]
    torch.save(ckpt, out / "last.pt")
    with pytest.raises(UsageError, match=r"^--resume: the run is at step 3, past step 2 where --max-steps 2 ends it"):
        run(ToyConfig(out=str(out), resume="auto", max_steps=2), ToyTask)


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


def test_a_stop_signal_during_an_epochs_last_step_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
    """The signal comes after the step's stop check (here: in its evaluation). The epoch ends as
    every rank agreed it would, and the next step stops the run; heeding the flag in between left
    the epoch neither ended nor resumable, and the loop asked for it again forever."""
    import signal

    from lomar.train import lifecycle

    class SignalledAtTheEpochsEnd(ToyTask):
        eval_steps = 4  # the epoch's last step: 32 points, batch 4 x accum 2

        def evaluate(self):
            if self.progress.step == 4 and not self.finished:
                self.finished = True
                signal.raise_signal(signal.SIGUSR1)
            return super().evaluate()

    calls, train_epoch = [], lifecycle._Run._train_epoch

    def counted(self, stream):
        calls.append(self.p.epoch)
        assert len(calls) <= 3, f"epoch {self.p.epoch} asked for again: {calls}"
        return train_epoch(self, stream)

    monkeypatch.setattr(lifecycle._Run, "_train_epoch", counted)
    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out)), SignalledAtTheEpochsEnd) == 0
    state = safe_load(out / "last.pt")
    assert (state["step"], state["epoch"], calls) == (5, 1, [0, 1])


def test_a_stop_signal_during_the_runs_last_step_that_ends_an_epoch_still_ends_the_epoch(tmp_path, capsys):
    """--max-steps 4 is epoch 0's last step; a SIGTERM in it came too late to stop anything, yet the run that said
    "done" skipped the epoch's end: its evaluation was logged as epoch 0 (partial), and no best.pt was written. It ends
    as the run without the signal does, and a resume finds it at its end."""

    class SignalledInTheLastStep(SignalledInStep4, ToyTask):
        pass

    def scored(out):
        return [(r["step"], r["epoch"], r["score"], r.get("partial")) for r in
                map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "score" in r]

    straight, stopped = tmp_path / "a", tmp_path / "b"
    assert run(ToyConfig(out=str(straight), max_steps=4), ToyTask) == 0
    capsys.readouterr()
    assert run(ToyConfig(out=str(stopped), max_steps=4), SignalledInTheLastStep) == 0
    line = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert line.startswith("lomar toy: done at step 4") and "best score" in line and "no best.pt" not in line
    assert scored(stopped) == scored(straight) and [s[:2] for s in scored(stopped)] == [(4, 1)]  # old code: (4, 0)
    a, b = safe_load(straight / "last.pt"), safe_load(stopped / "last.pt")
    assert (b["step"], b["epoch"], b["batches_done"]) == (a["step"], a["epoch"], a["batches_done"]) == (4, 1, 0)
    assert safe_load(stopped / "best.pt")["metrics"] == safe_load(straight / "best.pt")["metrics"]
    assert run(ToyConfig(out=str(stopped), max_steps=4, resume="auto"), ToyTask) == 0
    assert "nothing to do, the run is at step 4" in capsys.readouterr().out and scored(stopped) == scored(straight)


@pytest.mark.parametrize("signalled", [True, False])
def test_a_compile_that_a_stop_signal_killed_unwinds_as_the_signal(tmp_path, signalled):
    """--compile's first step builds C++ in child compilers of the process group, which a SIGTERM to the group kills
    too: the step failed with inductor's compile error after the stop flag was set, a traceback of thousands of lines
    (a CPU run: checked by hand). A stand-in error here: without a signal, a compile error stays what it is."""
    import signal

    from torch._inductor.exc import InductorError

    from lomar.train.preemption import Terminated

    class CompileKilled(ToyTask):
        def loss(self, batch):
            if signalled:
                signal.raise_signal(signal.SIGTERM)
            raise InductorError(RuntimeError("C++ compile error"), None)

    with pytest.raises(Terminated if signalled else InductorError) as caught:
        run(ToyConfig(out=str(tmp_path / "run")), CompileKilled)
    if signalled:  # lomar's one line, 'terminated (SIGTERM)', exit 143
        assert caught.value.args == (signal.SIGTERM,)


class Dropping(ToyTask):
    """Dropout in the model: every step draws from the global torch stream of its rank."""

    def __init__(self, config, info, device):
        super().__init__(config, info, device)
        self.model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(3, 1))
        self.train_loader.generator = torch.Generator()  # as every task's: a new iterator draws from it, not the stream


def _ddp_run(rank: int, world: int, port: int, out: str, max_steps: int, resume: bool) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    config = ToyConfig(out=out, max_steps=max_steps, resume="auto" if resume else None, accum_steps=1)
    code = run(config, Dropping)
    os._exit(code)  # skip the interpreter's teardown, which gloo's threads can abort (lomar.cli.app.run)


@pytest.mark.slow
def test_a_resumed_ddp_run_continues_every_ranks_own_random_stream(tmp_path):
    import torch.multiprocessing as mp

    def launch(out, max_steps, resume=False):
        # forked: neither process imports torch, lomar and this module afresh, as spawned ones did (3-4 s a launch)
        mp.start_processes(_ddp_run, args=(2, free_port(), str(out), max_steps, resume), nprocs=2,
                           start_method="fork")
        return safe_load(out / "last.pt")

    straight = launch(tmp_path / "straight", 6)
    launch(tmp_path / "resumed", 3)
    resumed = launch(tmp_path / "resumed", 6, resume=True)
    assert len(resumed["rng_ranks"]) == 2 and not torch.equal(resumed["rng_ranks"][0]["torch"],
                                                              resumed["rng_ranks"][1]["torch"])
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


class EmptyOnRankOne(ToyTask):
    """Rank 1's second batch has nothing to learn from (as when all its images are unreadable)."""

    calls = 0

    def loss(self, batch):
        self.calls += 1
        if torch.distributed.get_rank() == 1 and self.calls == 2:
            return None
        return super().loss(batch)


def _ranked_run(rank: int, port: int, out: str, task: type, settings: dict) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    try:
        code = run(ToyConfig(out=out, accum_steps=1, **settings), task)
    except Exception as exc:  # noqa: BLE001 - recorded for the test, which reads what each rank raised
        (Path(out) / f"rank{rank}.error").write_text(f"{type(exc).__name__}: {exc}")
        code = 1
    os._exit(code)


def run_two_ranks(task: type, out, hang: str, timeout: float = 120, errors: bool = False, code: int = 0,
                  **settings) -> list[str]:
    """A :class:`ToyConfig` run of ``task`` in two forked processes; fails with ``hang`` (what went out of step)
    when they have not both ended after ``timeout`` s, killing them: a collective that one rank never joins waits
    forever. ``errors``: the ranks may raise; each one's "Type: message" (or "") is returned; otherwise an error, or
    an exit code other than ``code``, fails the test."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(_ranked_run, args=(free_port(), str(out), task, settings), nprocs=2, join=False,
                                 start_method="fork")  # no fresh imports of torch and lomar (spawn: 3-4 s)
    deadline = time.monotonic() + timeout
    while not all(process.exitcode is not None for process in context.processes):
        time.sleep(0.2)
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(hang)
    raised = [(Path(out) / f"rank{rank}.error").read_text() if (Path(out) / f"rank{rank}.error").exists() else ""
              for rank in range(2)]
    if not errors and (any(raised) or any(process.exitcode != code for process in context.processes)):
        pytest.fail(f"the ranks raised {raised}, exit codes {[process.exitcode for process in context.processes]}")
    return raised


def test_the_last_line_counts_what_every_rank_skipped(tmp_path, capsys, monkeypatch):
    """Under torchrun rank 0 printed its own count: a file in another rank's share went unsaid, where one process
    says it. The ranks' files reach rank 0 as the checkpoint gathers them (a collective: here, rank 1's made up)."""
    from lomar.train.skipped_files import SkippedFiles

    monkeypatch.setattr(SkippedFiles, "gathered", lambda self, info: [[], ["b.png", "a.png"], ["a.png"]])
    assert run(ToyConfig(out=str(tmp_path), epochs=1), ToyTask) == 0
    done = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert done.endswith(", 2 unusable image(s) skipped, e.g. b.png")  # a file two ranks read is one file


class BatchNormed(ToyTask):
    """A BatchNorm before the regression: each rank's statistics move with its own batches."""

    def __init__(self, config, info, device):
        super().__init__(config, info, device)
        self.model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
        self.out = Path(config.out)

    def evaluate(self):
        self.model.eval()
        torch.save(self.model[0].running_mean, self.out / f"mean{torch.distributed.get_rank()}.pt")
        scores = super().evaluate()
        self.model.train()
        return scores


@pytest.mark.slow
def test_every_ddp_rank_evaluates_with_the_batch_norm_statistics_it_saves(tmp_path):
    """DDP gives the ranks rank 0's buffers before a training forward only: rank 1 scored its share with the
    statistics of its own last batch, neither the saved model's nor rank 0's (segment on CPU: 10 % of its pixels
    predicted otherwise than by the checkpoint)."""
    run_two_ranks(BatchNormed, tmp_path, "a rank left the other waiting", epochs=1)
    saved = safe_load(tmp_path / "last.pt")["model"]["0.running_mean"]
    assert torch.equal(torch.load(tmp_path / "mean0.pt", weights_only=True), saved)
    assert torch.equal(torch.load(tmp_path / "mean1.pt", weights_only=True), saved)


@pytest.mark.slow
def test_a_ddp_rank_with_nothing_to_learn_joins_the_step_with_an_idle_loss(tmp_path):
    # Its backward, weighted 0, is what lets the other rank's all-reduce finish: without it the run hangs.
    run_two_ranks(EmptyOnRankOne, tmp_path, "a rank without a loss left the other waiting in the all-reduce",
                  max_steps=3)
    assert safe_load(tmp_path / "last.pt")["step"] == 3 and len(_losses(tmp_path)) == 3


def test_a_run_that_would_go_past_its_lr_schedule_is_refused_before_a_step(tmp_path):
    """A first --max-steps fixes schedule_steps; resuming with a larger one would train every further
    step at min_lr (0: steps that change nothing)."""
    from lomar.errors import UsageError

    class Told(ToyTask):  # its class tells its schedule (Task.lr_schedule_of): refused unbuilt
        def __init__(self, config, info, device):
            raise AssertionError("built for a refusal that its settings and the checkpoint decide")

    out = tmp_path / "run"
    run(ToyConfig(out=str(out), max_steps=3, schedule_steps=3), ToyTask)
    refusals = []
    for task in (ToyTask, Told):
        with pytest.raises(UsageError, match=r"ends at step 3 \(schedule_steps\), but it would go on to step 8: "
                                             r"steps 4-8 would all train at min_lr 0; end it at --max-steps 3") as err:
            # 10 epochs reach step 8 at any steps an epoch, whatever data --data now holds
            run(ToyConfig(out=str(out), epochs=10, max_steps=8, schedule_steps=3, resume="auto"), task)
        refusals.append(str(err.value))
    assert refusals[0] == refusals[1] and safe_load(out / "last.pt")["step"] == 3
    # a new run is told to lengthen its schedule, not to go to another --out (its own is fine)
    with pytest.raises(UsageError, match=r"steps 4-8 would all train at min_lr 0; end it at --max-steps 3, or raise "
                                         r"--schedule-steps to 8$"):
        run(ToyConfig(out=str(tmp_path / "new"), max_steps=8, schedule_steps=3), ToyTask)


def sized(points: int) -> type[ToyTask]:
    """A ToyTask of ``points`` points (ToyTask's 32: 4 steps an epoch)."""
    return type("Sized", (ToyTask,), {"points": points})


@pytest.mark.parametrize("first, resumed, points, end", [
    # data grown to 8 steps an epoch: --epochs 1 reaches --max-steps 8 (at the checkpoint's 4, it stopped at step 4)
    (dict(epochs=4, max_steps=2), dict(epochs=1, max_steps=8), 64, 8),
    # data shrunk to 2 steps an epoch: --epochs 3 end at step 6, inside the schedule (at 4, at step 12, past it)
    (dict(epochs=1), dict(epochs=3), 16, 6)])
def test_a_resume_on_changed_data_is_refused_only_where_its_own_steps_an_epoch_say(tmp_path, first, resumed, points,
                                                                                 end):
    """--data may change on resume: the steps an epoch the checkpoint saved then tell nothing of the schedule's end
    (a resume is refused unbuilt only where any count would be), the built run's own do."""
    out = tmp_path / "run"
    run(ToyConfig(out=str(out), schedule_steps=8, **first), ToyTask)
    run(ToyConfig(out=str(out), schedule_steps=8, resume="auto", **resumed), sized(points))
    assert safe_load(out / "last.pt")["step"] == end


def test_a_max_steps_past_the_epochs_with_the_schedule_laid_over_it_is_refused(tmp_path):
    """A new run given --max-steps and no --epochs lays its schedule over those steps; when the (default) epochs
    end it first (3 epochs of 4 steps here), it stopped at step 12 with the lr mid-cosine, never annealed."""
    from lomar.errors import UsageError

    with pytest.raises(UsageError, match=r"--max-steps 20 is past the end of --epochs 3 \(step 12, at 4 steps an "
                                         r"epoch\), .* 20-step lr schedule .* pass --epochs 5 --max-steps 20 "
                                         r"--schedule-steps 20 to train all 20 steps, or --max-steps 12"):
        run(ToyConfig(out=str(tmp_path / "a"), max_steps=20, schedule_steps=20), ToyTask)
    assert not (tmp_path / "a").exists()
    run(ToyConfig(out=str(tmp_path / "b"), epochs=5, max_steps=20, schedule_steps=20), ToyTask)
    records = map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
    lrs = [record["lr"] for record in records if "lr" in record]
    assert len(lrs) == 20 and lrs[-1] < 0.01 * max(lrs)  # annealed
    run(ToyConfig(out=str(tmp_path / "c"), max_steps=20), ToyTask)  # the schedule spans the epochs: whichever first
    assert len(_losses(tmp_path / "c")) == 12


def test_a_resume_that_finds_the_run_at_its_end_writes_the_end_of_run_files_it_lacks(tmp_path, capsys):
    """A run whose end-of-run export failed after its last checkpoint (a full disk: '... free space, then rerun')
    was told 'nothing to do' by --resume auto, exit 0, and never got its export."""
    class Exporting(ToyTask):
        final_outputs = ("finished",)

    out = tmp_path / "run"
    run(ToyConfig(out=str(out), max_steps=3), Exporting)
    (out / "finished").unlink()
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), max_steps=3, resume="auto"), Exporting) == 0
    assert (out / "finished").read_text() == "yes"
    assert "nothing to do, the run is at step 3" in capsys.readouterr().out
    (out / "finished").write_text("kept")
    assert run(ToyConfig(out=str(out), max_steps=3, resume="auto"), Exporting) == 0
    assert (out / "finished").read_text() == "kept"  # present: not written again


def test_resume_auto_never_starts_over_on_top_of_unreadable_checkpoints(tmp_path, capsys):
    from lomar.errors import UsageError

    out = tmp_path / "run"
    run(ToyConfig(out=str(out), max_steps=4), ToyTask)
    for path in out.glob("*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    kept = sorted(p.name for p in out.iterdir())
    with pytest.raises(UsageError, match=r"--resume auto: no checkpoint in .* can be read \(.*last.pt cannot be "
                                         r"read, skipped.*\); restore one, or pass --overwrite"):
        run(ToyConfig(out=str(out), max_steps=8, resume="auto"), ToyTask)
    assert sorted(p.name for p in out.iterdir()) == kept and len(_losses(out)) == 4  # nothing deleted
    capsys.readouterr()
    assert run(ToyConfig(out=str(tmp_path / "new"), max_steps=2, resume="auto"), ToyTask) == 0
    assert f"lomar toy: note: nothing to resume in {tmp_path / 'new'}: a new run starts\n" in capsys.readouterr().err


def test_a_studys_runs_say_each_note_once_and_not_that_a_cells_evaluation_starts_anew(tmp_path, capsys,
                                                                                       monkeypatch):
    """A study's finetunes (``notes_said``: the lines it said) print their notes on stderr, which the study does not
    silence: each once a study, and no 'nothing to resume' for the --resume auto the study itself passes."""
    import lomar.train.precision as precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)  # bf16 emulated: the same note for every cell
    said: dict[str, None] = {}
    for cell in ("a", "b"):
        config = ToyConfig(out=str(tmp_path / cell), precision="bf16", max_steps=1, resume="auto")
        config.notes_said = said
        assert run(config, ToyTask) == 0
    noted = capsys.readouterr().err
    assert noted.count("lomar toy: note: bf16 on this CPU is emulated") == 1 and "nothing to resume" not in noted


def test_a_run_trained_by_another_number_of_processes_is_not_resumed_silently(tmp_path):
    """The process count sets the global batch (and a --blr run's lr), the epoch's length and what
    ``batches_done`` counts: a 2-process checkpoint resumed by one process would train another run."""
    from lomar.checkpoints.io import atomic_save
    from lomar.errors import UsageError

    out = tmp_path / "run"
    run(ToyConfig(out=str(out), max_steps=2), ToyTask)
    ckpt = safe_load(out / "last.pt")
    ckpt["rng_ranks"] = ckpt["rng_ranks"] * 2  # as two processes save it
    atomic_save(ckpt, out / "last.pt")
    with pytest.raises(UsageError, match=r"trained by 2 process\(es\) and this launch has 1; .* launch it with 2 "
                                         r"\(torchrun --nproc-per-node 2, or --nnodes × --nproc-per-node = 2 over "
                                         r"several machines\), or start"):  # the number to type, not 'N'
        run(ToyConfig(out=str(out), max_steps=4, resume="auto"), ToyTask)
    assert safe_load(out / "last.pt")["step"] == 2 and len(_losses(out)) == 2


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



class EvaluatedEvery2Steps(ToyTask):
    eval_steps = 2

    def evaluate(self):  # positive, as the commands' metrics are
        return {"score": 1 / (1 - super().evaluate()["score"])}


class SignalledInStep4:
    """A ToyTask mixin: a stop signal (SIGUSR1) comes during step 4, once."""

    def loss(self, batch):
        if self.progress.step == 3 and not self.finished:
            import signal

            self.finished = True
            signal.raise_signal(signal.SIGUSR1)
        return super().loss(batch)


class StoppedOnAnEvaluationStep(SignalledInStep4, EvaluatedEvery2Steps):
    """A stop signal comes during step 4, one that is evaluated."""


def test_a_run_stopped_on_an_evaluation_step_evaluates_it_when_resumed(tmp_path):
    """The stop checkpoints before the step's evaluation; the resumed run scores that step first, so its
    evaluations and best.pt are an uninterrupted run's (that step's score was missing, and best.pt could differ)."""
    straight, stopped = tmp_path / "a", tmp_path / "b"
    assert run(ToyConfig(out=str(straight), blr=0.05), EvaluatedEvery2Steps) == 0
    assert run(ToyConfig(out=str(stopped), blr=0.05), StoppedOnAnEvaluationStep) == 0
    assert safe_load(stopped / "last.pt")["step"] == 4
    assert run(ToyConfig(out=str(stopped), blr=0.05, resume="auto"), StoppedOnAnEvaluationStep) == 0

    def scores(out):
        return [(r["step"], r["score"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "score" in r]

    assert [step for step, _ in scores(straight)] == [2, 4, 6, 8, 10, 12]
    assert scores(stopped) == scores(straight) and _losses(stopped) == _losses(straight)
    a, b = safe_load(straight / "best.pt"), safe_load(stopped / "best.pt")
    assert a["step"] == b["step"] and a["metrics"] == b["metrics"]


def test_a_resume_at_the_end_rewrites_an_export_of_an_earlier_end(tmp_path, capsys):
    # a run extended past its end and stopped between its new last checkpoint and its new export kept the earlier
    # export: every later resume said "nothing to do" and left it, built or not
    class Exported(ToyTask):
        final_outputs = ("config.json",)
        stop_in_finish = False

        def finish(self, out):
            if self.stop_in_finish:
                raise KeyboardInterrupt  # a stop after the last checkpoint
            step = safe_load(out / "last.pt")["step"]
            (out / "config.json").write_text(json.dumps({"step": step}))

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=3), Exported) == 0
    Exported.stop_in_finish = True
    with pytest.raises(KeyboardInterrupt):
        run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Exported)
    Exported.stop_in_finish = False
    assert json.loads((out / "config.json").read_text()) == {"step": 3} and safe_load(out / "last.pt")["step"] == 5
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Exported) == 0
    assert json.loads((out / "config.json").read_text()) == {"step": 5}
    assert "nothing to do, the run is at step 5" in capsys.readouterr().out


def test_a_resume_at_the_end_runs_a_missing_final_evaluation_once(tmp_path, capsys):
    # a run extended past its end and stopped after its new last checkpoint, before its final evaluation: every later
    # resume said "nothing to do" (the step-3 score stayed the last), built or not
    class Scored(ToyTask):
        stop_in_evaluate, builds, evaluations = False, 0, 0

        def __init__(self, config, info, device):
            super().__init__(config, info, device)
            Scored.builds += 1

        def evaluate(self):
            if Scored.stop_in_evaluate and self.progress.final:
                raise KeyboardInterrupt  # a stop after the last checkpoint
            Scored.evaluations += 1
            return super().evaluate()

    def scored_steps():
        return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "score" in r]

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=3), Scored) == 0 and scored_steps() == [3]  # 4 steps an epoch
    Scored.stop_in_evaluate = True
    with pytest.raises(KeyboardInterrupt):
        run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Scored)
    Scored.stop_in_evaluate = False
    assert safe_load(out / "last.pt")["step"] == 5 and scored_steps() == [3, 4]
    Scored.builds = Scored.evaluations = 0
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Scored) == 0
    assert scored_steps() == [3, 4, 5] and (Scored.builds, Scored.evaluations) == (1, 1)
    assert "nothing to do, the run is at step 5" in capsys.readouterr().out
    assert run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Scored) == 0  # done: never scored twice
    assert scored_steps() == [3, 4, 5] and (Scored.builds, Scored.evaluations) == (1, 1)


def test_a_resume_that_runs_the_missing_final_evaluation_writes_the_end_files_from_it(tmp_path):
    # detect's finish writes predictions.json from the last evaluation: after the resumed one it kept the earlier
    # end's predictions (step 3) beside the step-5 score, as final_outputs names none of them
    class Predicting(ToyTask):
        stop_in_evaluate, scored = False, -1

        def evaluate(self):
            if Predicting.stop_in_evaluate and self.progress.final:
                raise KeyboardInterrupt  # a stop after the last checkpoint
            self.scored = self.progress.step
            return super().evaluate()

        def finish(self, out):
            (out / "predictions").write_text(str(self.scored))

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=3), Predicting) == 0
    assert (out / "predictions").read_text() == "3"
    Predicting.stop_in_evaluate = True
    with pytest.raises(KeyboardInterrupt):
        run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Predicting)
    Predicting.stop_in_evaluate = False
    assert run(ToyConfig(out=str(out), max_steps=5, resume="auto"), Predicting) == 0
    assert (out / "predictions").read_text() == "5"  # old code: "3"


class _Clock:
    """preemption's clock, which the run moves on: ``step_s`` seconds a step (its micro-batches share them; ``slow``:
    {step: seconds} for some), ``save_s`` a checkpoint save (the main process's files)."""

    def __init__(self, step_s: float, save_s: float = 0.0, slow: dict[int, float] | None = None):
        self.now, self.step_s, self.save_s, self.slow = 0.0, step_s, save_s, slow or {}

    def __call__(self) -> float:
        return self.now

    def task(self) -> type[ToyTask]:
        clock = self

        class Timed(ToyTask):
            def loss(self, batch):
                clock.now += clock.slow.get(self.progress.step + 1, clock.step_s) / 2  # accum_steps 2
                return super().loss(batch)

            def saved(self, path):
                clock.now += clock.save_s

        return Timed


def test_a_time_limit_stops_where_one_more_step_and_the_save_would_pass_it_and_the_run_resumes_exactly(
        tmp_path, capsys, monkeypatch):
    """10 s steps, a 35 s limit: at step 3 (30 s) another step would pass it, so the run stops there and ends within
    the limit (it stopped at step 4, 40 s, the final save after it). The stop is a SIGTERM's (checkpoint at the step,
    exit code of its own, one line saying the margin), and a resume given another limit goes on to an uninterrupted
    run's losses and weights."""
    from lomar.train import preemption

    clock = _Clock(step_s=10.0)
    monkeypatch.setattr(preemption, "monotonic", clock)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(ToyConfig(out=str(straight)), clock.task()) == 0
    clock.now = 0.0
    assert run(ToyConfig(out=str(stopped), time_limit=35), clock.task()) == preemption.TIME_LIMIT_EXIT == 75
    line = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert line.startswith("lomar toy: time limit 35s: stopped at step 3 with 5s left for the save (one more step "
                           "and the save would take 12s); checkpoint ") and "--resume auto" in line  # a save: 2 s
    assert safe_load(stopped / "last.pt")["step"] == 3 and not (stopped / "finished").exists()  # old code: 4
    assert clock.now <= 35
    clock.now = 0.0
    assert run(ToyConfig(out=str(stopped), resume="auto", time_limit=3600), clock.task()) == 0
    a, b = safe_load(straight / "last.pt"), safe_load(stopped / "last.pt")
    assert b["step"] == 12 and _losses(straight) == _losses(stopped)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)


def test_a_slow_step_widens_the_time_limits_margin(tmp_path, capsys, monkeypatch):
    """1 s steps and instant saves, step 6 taking 6.2 s, a 16 s limit: the margin is the longest recent step, so the
    run stops after step 6 (at 11.2 s, 4.8 s left) where it went on to step 11, past the limit (16.2 s)."""
    from lomar.train import preemption

    clock = _Clock(step_s=1.0, slow={6: 6.2})
    monkeypatch.setattr(preemption, "monotonic", clock)
    assert run(ToyConfig(out=str(tmp_path), time_limit=16), clock.task()) == 75
    assert "time limit 16s: stopped at step 6 with 5s left for the save (one more step and the save would take 6s)" \
        in capsys.readouterr().out
    assert safe_load(tmp_path / "last.pt")["step"] == 6 and clock.now == pytest.approx(11.2)  # old code: 11, 16.2 s


@pytest.mark.parametrize("limit, stop_step, said", [
    (23, 7, "stopped at step 7 with 8s left for the save (one more step and the save would take 9s)"),  # old: 9
    # at step 8 an epoch ends: its evaluation and save (9 s the last time) come before step 9
    (30, 8, "stopped at step 8 with 14s left for the save (the epoch's end or evaluation due, one more step and the "
            "save would take 17s)"),
])
def test_the_time_limits_margin_keeps_the_last_saves_time_for_the_final_save(tmp_path, capsys, monkeypatch, limit,
                                                                            stop_step, said):
    """1 s steps and 8 s saves: the first save (at the end of epoch 1, step 4) is measured, and from then on the run
    stops where the step and the save would pass the limit; the final save ends within it (old code: stopped at step
    9, its save ending at 33 s; with 30 s it trained on to the run's end at 44 s)."""
    from lomar.train import preemption

    clock = _Clock(step_s=1.0, save_s=8.0)
    monkeypatch.setattr(preemption, "monotonic", clock)
    assert run(ToyConfig(out=str(tmp_path), time_limit=limit), clock.task()) == 75
    assert said in capsys.readouterr().out
    assert safe_load(tmp_path / "last.pt")["step"] == stop_step and clock.now <= limit


def test_before_the_first_save_its_time_is_estimated_from_the_models_size(tmp_path, capsys, monkeypatch):
    """The toy model's 4 parameters, with AdamW's two moments 48 bytes, written at 16 bytes a second: 3 s, and 2 s for
    the rest of a save. With 1 s steps, an 8 s limit stops the run at step 3 (5 s left: not enough for a step and
    that save)."""
    from lomar.train import preemption

    clock = _Clock(step_s=1.0)
    monkeypatch.setattr(preemption, "monotonic", clock)
    monkeypatch.setattr(preemption, "SAVE_BYTES_PER_S", 48 / 3)
    assert run(ToyConfig(out=str(tmp_path), time_limit=8), clock.task()) == 75
    assert "stopped at step 3 with 5s left for the save (one more step and the save would take 6s)" in \
        capsys.readouterr().out
    assert safe_load(tmp_path / "last.pt")["step"] == 3  # old code: 8


def test_an_evaluation_due_every_other_epoch_widens_the_margin_at_every_epochs_end(tmp_path, capsys, monkeypatch):
    """1 s steps, 4 an epoch, instant saves; the evaluation (pretrain's --knn-every 2 alike) takes 20 s at the end of
    odd epochs: the margin at an epoch's end is the longest of the last epoch ends' intervals (21 s, the 20 s one), so
    under a 50 s limit the run stops at step 12 (32 s, 18 s left). Taken from the last epoch end alone (1 s, a cheap
    one), it went on into the third epoch's evaluation and stopped at step 13, at 53 s, past the limit."""
    from lomar.train import preemption

    clock = _Clock(step_s=1.0)

    class SlowOddEvaluations(clock.task()):
        def evaluate(self):
            clock.now += 20.0 if self.progress.epoch % 2 else 0.0
            return super().evaluate()

    monkeypatch.setattr(preemption, "monotonic", clock)
    assert run(ToyConfig(out=str(tmp_path), epochs=5, time_limit=50), SlowOddEvaluations) == 75
    assert ("time limit 50s: stopped at step 12 with 18s left for the save (the epoch's end or evaluation due, one "
            "more step and the save would take 21s)") in capsys.readouterr().out
    assert safe_load(tmp_path / "last.pt")["step"] == 12 and clock.now == 32.0  # old code: 13, 53 s


def test_the_time_limits_margin_leaves_out_what_compiling_took(tmp_path, capsys, monkeypatch):
    """1 s steps, 2 s saves, a model compiled in its first step (90 s, a cold --compile on a CPU) and again in the
    first evaluation (20 s, at step 4, the end of epoch 1), both counted by compile_seconds: under a 125 s limit the
    run goes on past step 1 (91 s) and past the epoch end of step 8 (120 s: that evaluation and save, 3 s without the
    compile, a step and the final save fit the 5 s left) and stops at step 9 (123 s), its final save ending at 125 s.
    The first step's 91 s taken for a step's stopped the run at step 1 with 34 s left; the evaluation's 23 s taken for
    an epoch end's would stop it at step 8."""
    from lomar.train import preemption

    clock, compiled = _Clock(step_s=1.0, save_s=2.0), []

    def compile_once(seconds: float) -> None:  # a stand-in for torch.compile's: the time passes and is counted
        if len(compiled) < 2:
            compiled.append(seconds)
            clock.now += seconds

    class Compiled(clock.task()):
        def loss(self, batch):
            if not compiled:
                compile_once(90.0)
            return super().loss(batch)

        def evaluate(self):
            compile_once(20.0)
            return super().evaluate()

    monkeypatch.setattr(preemption, "monotonic", clock)
    monkeypatch.setattr(preemption, "compile_seconds", lambda: sum(compiled))
    assert run(ToyConfig(out=str(tmp_path), time_limit=125), Compiled) == 75
    assert "time limit 2m5s: stopped at step 9 with 2s left for the save (one more step and the save would take 3s)" \
        in capsys.readouterr().out
    assert safe_load(tmp_path / "last.pt")["step"] == 9 and clock.now == 125.0  # old code: step 1, at 91 s


def test_the_first_run_of_a_lomar_command_counts_its_time_limit_from_the_commands_start(tmp_path, capsys,
                                                                                       monkeypatch):
    """A command that began 50 s before its run (start-up, listing a big folder) has used a 40 s limit up: the run
    stops at its first step, saying by how much it passed it. A later run in the process counts from its own call."""
    from lomar.train import preemption

    clock = _Clock(step_s=1.0)
    clock.now = 100.0
    monkeypatch.setattr(preemption, "monotonic", clock)
    preemption.mark_command_start(50.0)  # the run starts at 100 s
    assert run(ToyConfig(out=str(tmp_path), time_limit=40), clock.task()) == 75
    assert "time limit 40s: stopped at step 1, 11s past it; checkpoint " in capsys.readouterr().out
    assert run(ToyConfig(out=str(tmp_path), time_limit=40, resume="auto"), clock.task()) == 0


def test_lomar_counts_a_time_limit_from_its_process_start_and_a_python_caller_from_the_call(monkeypatch):
    from lomar.cli import app
    from lomar.train import preemption

    taken = []
    monkeypatch.setattr(app, "_run_command", lambda args: taken.append(preemption.take_command_start()))
    monkeypatch.setattr("sys.argv", ["lomar", "pretrain"])
    assert app.main() == 0
    assert app.main(["pretrain"]) == 0
    since_process_start, since_call = (preemption.monotonic() - start for start in taken)
    assert since_process_start > 1.0 > since_call  # this process has run for seconds: pytest imported torch
    assert preemption.take_command_start() is None  # the command's end: a later run counts from its own call


def test_under_torchrun_a_time_limit_stops_with_exit_0(tmp_path, capsys, monkeypatch):
    """torchrun takes any other code for a failure: it reports one and, given --max-restarts, restarts the workers,
    which resume with a limit of their own and train on past the one that stopped them."""
    from lomar.train import preemption

    clock = _Clock(step_s=10.0)
    monkeypatch.setattr(preemption, "monotonic", clock)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # what torchrun gives each worker
    assert run(ToyConfig(out=str(tmp_path), time_limit=35), clock.task()) == 0  # old code: 75
    assert "time limit 35s: stopped at step 3 with 5s left for the save" in capsys.readouterr().out


class TimedOutOnRankZero(ToyTask):
    """Rank 0's clock passes the limit during step 2; rank 1's never does."""

    def loss(self, batch):
        if torch.distributed.get_rank() == 0 and self.progress.step == 1:
            from lomar.train import preemption

            preemption.monotonic = lambda: float("inf")
        return super().loss(batch)


@pytest.mark.slow
def test_every_rank_stops_at_the_step_one_rank_finds_past_the_time_limit(tmp_path):
    """The step's one stop agreement carries the limit: both ranks checkpoint step 2 and exit 75 (rank 1 going on
    alone would wait in step 3's all-reduce for rank 0, which is saving)."""
    run_two_ranks(TimedOutOnRankZero, tmp_path, "a rank went on past the time limit", code=75, time_limit=3600)
    assert safe_load(tmp_path / "last.pt")["step"] == 2


def test_an_auto_run_resumed_where_auto_picks_another_precision_keeps_its_own_and_says_so(tmp_path, capsys,
                                                                                           monkeypatch):
    """--precision auto is resolved once, where the run starts, and recorded in its checkpoints: a resume on a CPU
    without bf16 products (an AMD CI machine) of a run begun on an AMX one went on in fp32, silently."""
    import lomar.train.precision as precision

    out = tmp_path / "r"
    for has_bf16, steps in ((True, 2), (False, 4)):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert run(ToyConfig(out=str(out), precision="auto", max_steps=steps, resume="auto"), ToyTask) == 0
    printed = capsys.readouterr()
    assert "device cpu, precision bf16" in printed.out and "device cpu, precision fp32" not in printed.out
    # on stderr, as every note: stdout holds the run's own lines, for a program reading them
    assert ("lomar toy: note: precision bf16, the one the run trained in (this machine's --precision auto would pick "
            "fp32); pass --precision fp32 to switch\n") in printed.err and "trained in" not in printed.out
    assert safe_load(out / "last.pt")["precision"] == "bf16"


def test_bf16_asked_of_a_cpu_that_emulates_it_is_told_at_the_start(tmp_path, capsys, monkeypatch):
    """Emulated bf16 ran ~10x slower than fp32 here without a word; a CPU with bf16 products, or auto, is not told."""
    import lomar.train.precision as precision

    note = ("lomar toy: note: bf16 on this CPU is emulated (no AVX-512 BF16/AMX): expect it several times slower than "
            "fp32; --precision auto picks fp32 here\n")
    for has_bf16, setting, told in ((False, "bf16", True), (True, "bf16", False), (False, "auto", False)):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert run(ToyConfig(out=str(tmp_path / f"{has_bf16}{setting}"), precision=setting, max_steps=1), ToyTask) == 0
        printed = capsys.readouterr()
        assert printed.out.startswith("lomar toy: 32 images") and "emulated" not in printed.out
        assert (printed.err[:len(note)] == note) == told == printed.err.count(note)


def test_a_precision_given_to_a_resume_switches_it_in_one_line_and_fp16s_scale_either_way(tmp_path, capsys):
    """bf16 -> fp16: the checkpoint's scaler state is empty (a disabled scaler's), which GradScaler refused with a
    traceback; fp16's scale starts afresh. fp16 -> bf16: the fp16 scale is left behind."""
    out = tmp_path / "r"
    assert run(ToyConfig(out=str(out), precision="bf16", max_steps=2), ToyTask) == 0
    assert safe_load(out / "last.pt")["scaler"] == {}
    for was, now, steps in (("bf16", "fp16", 4), ("fp16", "bf16", 6)):
        capsys.readouterr()
        assert run(ToyConfig(out=str(out), precision=now, max_steps=steps, resume="auto"), ToyTask) == 0
        extra = "; fp16's loss scale starts afresh, as a new fp16 run's" if now == "fp16" else ""
        assert (f"lomar toy: note: precision {was} → {now} after step {steps - 2}, as --precision {now} asks{extra}\n"
                in capsys.readouterr().err)
        ckpt = safe_load(out / "last.pt")
        assert ckpt["precision"] == now and bool(ckpt["scaler"]) == (now == "fp16")
    scaled = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss_scale" in r]
    assert scaled == [3, 4]


def test_an_older_checkpoint_of_a_cuda_run_resumes_on_a_cpu_saying_what_it_gets(tmp_path, capsys):
    """A checkpoint written before the precision was recorded gets this machine's auto, and the line says so; a
    device of another kind (its RNG state holds a CUDA stream: a CUDA run's) is told, not silently taken."""
    from lomar.checkpoints.io import atomic_save

    out = tmp_path / "r"
    assert run(ToyConfig(out=str(out), precision="auto", max_steps=2), ToyTask) == 0
    ckpt = safe_load(out / "last.pt")
    del ckpt["precision"]
    for state in (ckpt["rng"], *ckpt["rng_ranks"]):
        state["cuda"] = torch.zeros(16, dtype=torch.uint8)
    atomic_save(ckpt, out / "last.pt")
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), precision="auto", max_steps=4, resume="auto"), ToyTask) == 0
    printed, own = capsys.readouterr().err, resolve_precision("auto", torch.device("cpu"))
    assert (f"lomar toy: note: precision {own}, --precision auto's choice on this machine: the checkpoint does not "
            f"record the precision the run trained in\n") in printed
    assert ("lomar toy: note: device cuda → cpu after step 2: the weights and optimizer state move over; its kernels "
            "and device random draws (drop path) differ, so it does not go on bit for bit\n") in printed


def test_bf16_asked_of_a_resume_that_trained_in_bf16_names_no_false_way_out(tmp_path, capsys, monkeypatch):
    """--precision auto keeps a resumed run's recorded bf16, so the emulated-bf16 note of a resume given
    --precision bf16 on a CPU without bf16 products must not say that auto picks fp32 there."""
    import lomar.train.precision as precision

    out = tmp_path / "r"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert run(ToyConfig(out=str(out), precision="bf16", max_steps=1), ToyTask) == 0
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), precision="bf16", max_steps=2, resume="auto"), ToyTask) == 0
    printed = capsys.readouterr().err
    assert ("lomar toy: note: bf16 on this CPU is emulated (no AVX-512 BF16/AMX): expect it several times slower "
            "than fp32\n") in printed and "auto picks" not in printed
