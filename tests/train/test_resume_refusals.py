"""Resumes (and new runs) the lifecycle refuses, each with one line naming the cause and the fix: settings that end
before the run's step or past its lr schedule, unreadable checkpoints, another number of processes."""

from __future__ import annotations

import json

import pytest
import torch
from toy_run import ToyConfig, ToyTask, _losses

from lomar.checkpoints.io import safe_load
from lomar.train.lifecycle import run


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
    # refused, not "nothing to do" with a missing export written from step 8's weights as the end of a 5-step run;
    # before the Task is built (finetune's reads its pretrained encoder and prints the load line)
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
