"""A resume's best.pt (lomar.train.rewound_best): every reader of a run folder takes best.pt first, so a resume
from checkpoint N leaves none of a step after N, and the run writes the next one that reaches the best up to N, the
best score checkpoint N records as it was scored (None before any scored epoch)."""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

import pytest
import torch
from toy_run import ToyConfig, ToyTask

from lomar.checkpoints.io import safe_load
from lomar.train.lifecycle import run


class _Scripted(ToyTask):
    """Each epoch's end (steps 4, 8, 12) scores what ``scores`` says for its step."""

    scores: dict[int, float] = {}

    def evaluate(self):
        return {"score": self.scores[self.progress.step]}


def _run_to_12_keeping_8(out, scores: dict[int, float]) -> None:
    _Scripted.scores = scores
    assert run(ToyConfig(out=str(out), max_steps=8), _Scripted) == 0
    shutil.copy(out / "last.pt", out / "checkpoint-000008.pt")
    assert run(ToyConfig(out=str(out), max_steps=12, resume="auto"), _Scripted) == 0


def _rewind_to_8(out, scores: dict[int, float]) -> int:
    _Scripted.scores = scores
    return run(ToyConfig(out=str(out), max_steps=12, resume=str(out / "checkpoint-000008.pt"), overwrite=True),
               _Scripted)


def test_a_rewind_past_the_best_step_leaves_no_later_best_and_the_next_better_evaluation_writes_one(tmp_path,
                                                                                                    capsys):
    out = tmp_path / "run"
    _run_to_12_keeping_8(out, {4: 0.6, 8: 0.5, 12: 0.9})
    assert safe_load(out / "best.pt")["step"] == 12
    capsys.readouterr()
    assert _rewind_to_8(out, {4: 0.6, 8: 0.5, 12: 0.55}) == 0  # below step 4's 0.6, the best up to 8
    said = capsys.readouterr()
    assert not (out / "best.pt").exists()  # step 12's of the dropped run; step 4's weights were overwritten by it
    assert "removed" in said.err and "best.pt (step 12)" in said.err and "up to step 8 (score 0.6)" in said.err
    assert "no best.pt: no evaluation since a resume removed it reached score 0.6" in said.out.splitlines()[-1]
    assert _rewind_to_8(out, {4: 0.6, 8: 0.5, 12: 0.7}) == 0
    best = safe_load(out / "best.pt")
    assert (best["step"], best["metrics"]) == (12, {"score": 0.7})
    assert "best score 0.7 in" in capsys.readouterr().out.splitlines()[-1]


def test_a_rewind_that_keeps_the_best_step_keeps_its_best(tmp_path):
    out = tmp_path / "run"
    _run_to_12_keeping_8(out, {4: 0.9, 8: 0.5, 12: 0.6})
    kept = (out / "best.pt").read_bytes()
    assert _rewind_to_8(out, {4: 0.9, 8: 0.5, 12: 0.6}) == 0
    assert (out / "best.pt").read_bytes() == kept and safe_load(out / "best.pt")["step"] == 4


def test_a_rewind_to_the_best_step_writes_its_best_from_that_checkpoint(tmp_path):
    out = tmp_path / "run"
    _Scripted.scores = {4: 0.5, 8: 0.7, 12: 0.9}
    assert run(ToyConfig(out=str(out), max_steps=8), _Scripted) == 0
    shutil.copy(out / "last.pt", out / "checkpoint-000008.pt")
    saved = safe_load(out / "best.pt")  # step 8's, as its save wrote it
    assert run(ToyConfig(out=str(out), max_steps=12, resume="auto"), _Scripted) == 0
    assert run(ToyConfig(out=str(out), max_steps=8, resume=str(out / "checkpoint-000008.pt"), overwrite=True),
               _Scripted) == 0  # to the run's end: nothing to train
    best = safe_load(out / "best.pt")
    assert best.keys() == saved.keys() and {k: v for k, v in best.items() if k != "model"} == {
        k: v for k, v in saved.items() if k != "model"}
    assert best["step"] == 8 and best["metrics"] == {"score": 0.7}
    assert all(torch.equal(best["model"][k], saved["model"][k]) for k in saved["model"])


def test_a_resume_auto_after_a_kill_between_best_and_its_checkpoint_leaves_no_best_of_a_dropped_step(tmp_path):
    # best.pt is written before the checkpoint of its step: a kill between them leaves last.pt at the step before
    out = tmp_path / "run"
    _Scripted.scores = {4: 0.5, 6: 0.1, 8: 0.9}
    assert run(ToyConfig(out=str(out), max_steps=4), _Scripted) == 0
    shutil.copy(out / "last.pt", tmp_path / "step4.pt")
    assert run(ToyConfig(out=str(out), max_steps=8, resume="auto"), _Scripted) == 0
    shutil.copy(tmp_path / "step4.pt", out / "last.pt")
    assert run(ToyConfig(out=str(out), max_steps=6, resume="auto"), _Scripted) == 0  # ends before step 8
    assert safe_load(out / "best.pt")["step"] == 4  # step 4's, the best up to it, not the dropped step 8's


def test_a_run_ending_inside_its_first_epoch_says_no_full_epoch_scored_not_that_a_resume_removed_best(tmp_path,
                                                                                                     capsys):
    # its end's evaluation is partial: logged with a score, no best.pt candidate, and no resume removed anything
    assert run(ToyConfig(out=str(tmp_path / "run"), max_steps=3), ToyTask) == 0  # an epoch is 4 steps
    done = capsys.readouterr().out.splitlines()[-1]
    assert not (tmp_path / "run" / "best.pt").exists()
    assert "no best.pt: no full epoch scored a score yet" in done and "resume" not in done


def test_a_resume_carries_a_best_below_zero_exactly_and_a_better_negative_score_writes_best(tmp_path, capsys):
    # a metric that can be negative (the toy's score is minus a loss): the best up to a checkpoint, as it scored
    out = tmp_path / "run"
    _Scripted.scores = {4: -0.6, 8: -0.9, 12: -0.5}
    assert run(ToyConfig(out=str(out), max_steps=8), _Scripted) == 0
    assert safe_load(out / "last.pt")["best_score"] == -0.6
    assert run(ToyConfig(out=str(out), max_steps=12, resume="auto"), _Scripted) == 0
    best = safe_load(out / "best.pt")
    assert (best["step"], best["metrics"]) == (12, {"score": -0.5})  # above step 4's -0.6, the best it resumed with
    assert safe_load(out / "last.pt")["best_score"] == -0.5
    assert "best score -0.5 in" in capsys.readouterr().out.splitlines()[-1]


def test_a_checkpoint_before_any_scored_epoch_records_no_best_and_its_resume_says_none_was_scored(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=2), ToyTask) == 0  # an epoch is 4 steps
    assert safe_load(out / "last.pt")["best_score"] is None  # not a score of 0: none was made
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), max_steps=3, resume="auto"), ToyTask) == 0
    done = capsys.readouterr().out.splitlines()[-1]
    assert "no best.pt: no full epoch scored a score yet" in done and "resume" not in done


def test_a_damaged_best_goes_on_a_rewind_or_is_written_from_the_checkpoint_of_the_best_step(tmp_path, capsys):
    """A best.pt that cannot be read holds no step the rewind can tell it keeps, and every reader of the folder
    refuses it (where last.pt would do): it goes with a note, or is written from checkpoint 8 when step 8 is the
    best, as one of a dropped step."""
    out = tmp_path / "run"
    _run_to_12_keeping_8(out, {4: 0.6, 8: 0.5, 12: 0.9})
    (out / "best.pt").write_bytes((out / "best.pt").read_bytes()[:1000])  # cut short
    capsys.readouterr()
    assert _rewind_to_8(out, {4: 0.6, 8: 0.5, 12: 0.55}) == 0
    said = capsys.readouterr()
    assert not (out / "best.pt").exists()
    assert f"note: removed {out / 'best.pt'} (damaged: it cannot be read), of no step this resume can tell it " \
           f"keeps; the next evaluation that reaches the best up to step 8 (score 0.6) writes it again" in said.err
    assert "no best.pt: no evaluation since a resume removed it reached score 0.6" in said.out.splitlines()[-1]
    best = tmp_path / "best"
    _run_to_12_keeping_8(best, {4: 0.5, 8: 0.7, 12: 0.9})
    (best / "best.pt").write_bytes(b"not a checkpoint")
    assert run(ToyConfig(out=str(best), max_steps=8, resume=str(best / "checkpoint-000008.pt"), overwrite=True),
               _Scripted) == 0  # to the run's end: nothing to train
    assert safe_load(best / "best.pt")["step"] == 8 and safe_load(best / "best.pt")["metrics"] == {"score": 0.7}


def test_a_checkpoint_holding_0_for_no_score_before_any_evaluation_resumes_as_scoring_none(tmp_path, capsys):
    # no evaluation ran up to it (evaluated_step -1): a best of 0.0 it holds stands for none scored, not a score of 0
    out = tmp_path / "run"
    assert run(ToyConfig(out=str(out), max_steps=2), ToyTask) == 0
    state = safe_load(out / "last.pt")
    assert state["evaluated_step"] == -1
    torch.save({**state, "best_score": 0.0}, out / "last.pt")
    capsys.readouterr()
    assert run(ToyConfig(out=str(out), max_steps=3, resume="auto"), ToyTask) == 0
    done = capsys.readouterr().out.splitlines()[-1]
    assert "no best.pt: no full epoch scored a score yet" in done and "resume" not in done
    assert safe_load(out / "last.pt")["best_score"] is None


def test_a_best_the_system_refuses_to_read_is_left_with_a_warning(tmp_path, capsys, monkeypatch):
    """A best.pt whose read the system refuses (its permissions, an NFS server's error: maybe for a moment) shows no
    damage: the resume leaves it, saying why it could not tell its step, and removes no file it could not read."""
    out = tmp_path / "run"
    _run_to_12_keeping_8(out, {4: 0.6, 8: 0.5, 12: 0.9})
    kept = (out / "best.pt").read_bytes()
    load = torch.load

    def refused(path, *args, **kwargs):
        if Path(path).name == "best.pt":
            raise PermissionError(13, "Permission denied", str(path))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", refused)
    capsys.readouterr()
    assert _rewind_to_8(out, {4: 0.6, 8: 0.5, 12: 0.55}) == 0
    assert f"warning: cannot read {out / 'best.pt'} (Permission denied) to tell its step; left as it is" \
        in capsys.readouterr().err
    assert (out / "best.pt").read_bytes() == kept


@pytest.mark.parametrize("holding", ["python objects", "a tensor"])
def test_a_whole_best_holding_no_checkpoint_lomar_reads_is_left_with_a_warning(tmp_path, capsys, holding):
    """A best.pt that torch.save wrote whole (every entry's CRC sound), holding Python objects (a user's own
    torch.save of a model object) or no dict (a weights-only load reads a tensor, lomar takes no checkpoint of it) is
    no damaged file: the resume leaves it, saying why it could not tell its step."""
    out = tmp_path / "run"
    _run_to_12_keeping_8(out, {4: 0.6, 8: 0.5, 12: 0.9})
    torch.save({**safe_load(out / "best.pt"), "saved_from": PurePosixPath("mine")} if holding == "python objects"
               else torch.zeros(3), out / "best.pt")
    kept = (out / "best.pt").read_bytes()
    capsys.readouterr()
    assert _rewind_to_8(out, {4: 0.6, 8: 0.5, 12: 0.55}) == 0
    assert f"warning: cannot read {out / 'best.pt'} (a whole archive holding no checkpoint lomar reads) to tell its " \
           f"step; left as it is" in capsys.readouterr().err
    assert (out / "best.pt").read_bytes() == kept
