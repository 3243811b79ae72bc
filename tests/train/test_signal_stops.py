"""A stop signal during a run: where the run stops, that the epoch it was in still ends, that a compile it killed
unwinds as the signal, and that the resumed run scores the step it stopped on."""

from __future__ import annotations

import json
import re
import signal

import pytest
from toy_run import ToyConfig, ToyTask, _losses

from lomar.checkpoints.io import safe_load
from lomar.train.lifecycle import run


def _signalled_in_evaluation(task: type, step: int, sent: int) -> type:
    """``task`` whose evaluation of ``step`` gets the signal ``sent``, once."""

    class SignalledInAnEvaluation(task):
        def evaluate(self):
            if self.progress.step == step and not self.finished:
                self.finished = True
                signal.raise_signal(sent)
            return super().evaluate()

    return SignalledInAnEvaluation


def test_a_stop_signal_during_an_epochs_last_evaluation_stops_the_run_there_and_the_resume_ends_the_epoch(tmp_path,
                                                                                                     monkeypatch):
    """The signal comes after the step's stop check (here: in its evaluation, at the epoch's last step). The run stops
    right after the evaluation, its epoch not asked for again (heeding the flag without the ranks' agreement would
    leave the epoch neither ended nor resumable, the loop asking for it forever); the resume ends the epoch and trains
    on as the run without the signal does."""
    from lomar.train import lifecycle

    class EvaluatedAtTheEpochsEnd(ToyTask):
        eval_steps = 4  # the epoch's last step: 32 points, batch 4 x accum 2

    signalled = _signalled_in_evaluation(EvaluatedAtTheEpochsEnd, 4, signal.SIGUSR1)

    calls, train_epoch = [], lifecycle._Run._train_epoch

    def counted(self, stream):
        calls.append(self.p.epoch)
        assert len(calls) <= 3, f"epoch {self.p.epoch} asked for again: {calls}"
        return train_epoch(self, stream)

    monkeypatch.setattr(lifecycle._Run, "_train_epoch", counted)
    straight, out = tmp_path / "a", tmp_path / "run"
    assert run(ToyConfig(out=str(out)), signalled) == 0
    state = safe_load(out / "last.pt")
    assert (state["step"], state["epoch"], state["batches_done"], state["evaluated_step"], calls) == (4, 0, 8, 4, [0])
    monkeypatch.undo()
    assert run(ToyConfig(out=str(out), resume="auto"), signalled) == 0
    assert run(ToyConfig(out=str(straight)), EvaluatedAtTheEpochsEnd) == 0
    assert _losses(out) == _losses(straight) and len(_losses(out)) == 12


@pytest.mark.parametrize(("task", "step", "epoch"), [("evaluated every 2 steps", 2, 0),
                                                     ("evaluated at each epoch's end", 4, 1)])
def test_a_ctrl_c_during_an_evaluation_stops_the_run_right_after_it_with_its_checkpoint(tmp_path, monkeypatch, capfd,
                                                                                        task, step, epoch):
    """An evaluation takes minutes (a COCO validation set): a Ctrl-C during it is answered with the evaluation's end,
    recorded and checkpointed once, not with one more step (and its loader's start-up) after it."""
    from lomar.train import lifecycle

    evaluated = EvaluatedEvery2Steps if task.startswith("evaluated every") else ToyTask

    saved, save_checkpoint = [], lifecycle.save_checkpoint

    def counted(state, *args):
        saved.append(state["step"])
        return save_checkpoint(state, *args)

    monkeypatch.setattr(lifecycle, "save_checkpoint", counted)
    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out)), _signalled_in_evaluation(evaluated, step, signal.SIGINT)) == 130
    err = capfd.readouterr()
    assert err.err == ("lomar toy: Ctrl-C: saving a checkpoint at the end of this evaluation, then stopping (Ctrl-C "
                       "again stops at once, without it)\n")
    assert f"stopped by SIGINT at step {step}" in err.out
    state = safe_load(out / "last.pt")
    assert (state["step"], state["epoch"], state["evaluated_step"]) == (step, epoch, step)
    assert saved == [step] and len(_losses(out)) == step  # the evaluation's checkpoint, written once
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "score" in r] == [step]


def test_a_ctrl_c_during_the_last_epochs_evaluation_is_answered_with_the_runs_end(tmp_path, capfd):
    """The last step is done, and nothing stops what follows it (the epoch's evaluation, the run's last checkpoint and
    files): a Ctrl-C during that evaluation is answered as one past the last step, and the run ends done (exit 0)."""
    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out)), _signalled_in_evaluation(ToyTask, 12, signal.SIGINT)) == 0
    said = capfd.readouterr()
    assert said.err.splitlines()[0] == ("lomar toy: Ctrl-C: the training is done; finishing the run's last checkpoint, "
                                        "evaluation and files (Ctrl-C again stops at once, without them)")
    assert said.out.splitlines()[-1].startswith("lomar toy: done at step 12") and (out / "finished").is_file()


def test_a_ctrl_c_under_torchrun_in_the_first_evaluation_that_scores_says_it_cannot_tell_yet(tmp_path, monkeypatch,
                                                                                          capfd):
    """pretrain's k-NN every few epochs (detect's and segment's evaluation every N steps alike) comes after epoch ends
    that score nothing, whose intervals time a save and a loader's start-up, not an evaluation: the first evaluation
    that scores has none before it to go by, as the run's first has none."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    monkeypatch.delenv("PET_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)

    class ScoredEvery2Epochs(ToyTask):
        def evaluate(self):
            return super().evaluate() if self.progress.step % 8 == 0 else {}

    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out)), _signalled_in_evaluation(ScoredEvery2Epochs, 8, signal.SIGINT)) == 130
    said = [line for line in capfd.readouterr().err.splitlines() if "Ctrl-C:" in line]
    assert len(said) == 1 and "at the end of this evaluation" in said[0]
    assert "; but torchrun kills its processes 30 s after a Ctrl-C" in said[0]
    assert re.search(r"the run's first evaluation \(\d+s so far\) and a save take cannot be told yet", said[0])


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
    assert scored(stopped) == scored(straight) and [s[:2] for s in scored(stopped)] == [(4, 1)]  # not (4, 0)
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


def test_a_stop_signal_during_begin_stops_the_run_before_its_first_step(tmp_path, capsys):
    """pretrain draws its first reconstruction figure in begin (minutes at 2048 px on a CPU): a SIGTERM there stops the
    run at its end, checkpointed at step 0, where it trained a first step before heeding it; the resume trains as the
    run without the signal does."""

    class SignalledInBegin(ToyTask):
        def begin(self):
            if self.progress.step == 0:
                signal.raise_signal(signal.SIGTERM)

    out, straight = tmp_path / "run", tmp_path / "a"
    assert run(ToyConfig(out=str(out)), SignalledInBegin) == 0
    assert "stopped by SIGTERM at step 0" in capsys.readouterr().out
    assert safe_load(out / "last.pt")["step"] == 0 and _losses(out) == []
    assert run(ToyConfig(out=str(out), resume="auto"), ToyTask) == 0
    assert run(ToyConfig(out=str(straight)), ToyTask) == 0
    assert _losses(out) == _losses(straight) and len(_losses(out)) == 12
