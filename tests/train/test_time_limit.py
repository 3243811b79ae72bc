"""--time-limit: the run stops where one more step and the save would pass it, with a margin from the longest
recent step, save, epoch end and evaluation (compiling left out), counted from the command's start."""

from __future__ import annotations

import pytest
import torch
from toy_run import ToyConfig, ToyTask, _losses, run_two_ranks

from lomar.checkpoints.io import safe_load
from lomar.train.lifecycle import run


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
    assert safe_load(stopped / "last.pt")["step"] == 3 and not (stopped / "finished").exists()  # not 4
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
    assert safe_load(tmp_path / "last.pt")["step"] == 6 and clock.now == pytest.approx(11.2)  # not 11, at 16.2 s


@pytest.mark.parametrize("limit, stop_step, said", [
    (23, 7, "stopped at step 7 with 8s left for the save (one more step and the save would take 9s)"),  # old: 9
    # at step 8 an epoch ends: its evaluation and save (9 s the last time) come before step 9
    (30, 8, "stopped at step 8 with 14s left for the save (the epoch's end or evaluation due, one more step and the "
            "save would take 17s)"),
])
def test_the_time_limits_margin_keeps_the_last_saves_time_for_the_final_save(tmp_path, capsys, monkeypatch, limit,
                                                                            stop_step, said):
    """1 s steps and 8 s saves: the first save (at the end of epoch 1, step 4) is measured, and from then on the run
    stops where the step and the save would pass the limit; the final save ends within it (not at step 9,
    its save ending at 33 s; nor, with 30 s, at the run's end at 44 s)."""
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
    assert safe_load(tmp_path / "last.pt")["step"] == 3  # not 8


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
    assert safe_load(tmp_path / "last.pt")["step"] == 12 and clock.now == 32.0  # not 13, at 53 s


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
    assert safe_load(tmp_path / "last.pt")["step"] == 9 and clock.now == 125.0  # not step 1, at 91 s


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
    assert run(ToyConfig(out=str(tmp_path), time_limit=35), clock.task()) == 0  # not 75
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
