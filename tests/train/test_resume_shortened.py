"""A resume whose --max-steps or --epochs end the run sooner than it was set to end: its lr schedule is the run's own
(schedule_steps is fixed, the end run-control), so the start says the run stops with the lr mid-schedule."""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

from toy_run import ToyConfig, ToyTask

from helpers import pretrain
from lomar.checkpoints.io import atomic_save, safe_load
from lomar.lr_schedule import lr_at_whole_steps
from lomar.train.lifecycle import run
from lomar.train.schedule import shortened_warning, warmup_warning


def test_a_pretraining_resumed_with_a_smaller_max_steps_is_told_its_schedule_is_the_runs(pretrained, tmp_path,
                                                                                          capsys):
    # a run set to end with its 2 epochs of 4 steps (the lr schedule's end), stopped after step 1 (a Ctrl-C)
    out = tmp_path / "run"
    shutil.copytree(pretrained.parent, out)
    state = safe_load(out / "last.pt")
    state["config"]["max_steps"] = None
    atomic_save(state, out / "last.pt")
    capsys.readouterr()
    assert pretrain("--resume", str(out / "last.pt"), "--max-steps", "5") == 0
    err = capsys.readouterr().err
    assert re.search(r"lomar pretrain: warning: --max-steps 5 ends this resumed run at step 5, before step 8 where it "
                     r"was set to end; its lr schedule is the run's own, laid when it began \(a resume keeps it\), and "
                     r"ends at step 8: the run stops with the lr at 0\.00075 \(0\.75 x the peak 0\.001\), not "
                     r"annealed; resume with --max-steps 8 to go on to step 8, or start a new run \(another --out\) "
                     r"with --max-steps 5 to lay a schedule over that length\n", err), err


def test_a_resume_that_keeps_or_moves_the_runs_end_later_is_not_told(tmp_path, capsys):
    # 3 epochs of 4 steps (the lr schedule's 12), stopped at step 5; each resume's end against where the run was set
    for given, was, told in ((7, 7, False), (None, 8, False), (9, None, True), (6, 9, True)):
        out = tmp_path / f"run{given}-{was}"
        assert run(ToyConfig(out=str(out), max_steps=5), ToyTask) == 0
        config = ToyConfig(out=str(out), resume="auto", max_steps=given)
        config.resumed_end = {"epochs": 3, "max_steps": was}
        capsys.readouterr()
        assert run(config, ToyTask) == 0
        assert ("ends this resumed run" in capsys.readouterr().err) == told, (given, was)


def test_a_resume_stopping_at_the_peak_of_beits_whole_step_warm_up_is_told():
    """BEiT's warm-up of 2.4 steps peaks at step 2 (whole steps): a resume stopping there is past the warm-up's peak,
    which the warm-up warning leaves unsaid, and far from the schedule's end."""
    config = SimpleNamespace(max_steps=2, epochs=6, warmup_steps=None, schedule_steps=24)
    told = shortened_warning(2, 24, 24.0, 2.4, 1e-3, 0.0, lr_at_whole_steps, config, 4)
    assert told is not None and "the run stops with the lr at 0.001 (1 x the peak 0.001)" in told
    assert warmup_warning(2, 24.0, 2.4, 1e-3, 0.0, lr_at_whole_steps, config=config, resumed=True) is None
    assert shortened_warning(2, 24, 24.0, 3, 1e-3, 0.0, None, config, 4) is None  # below the peak: warmup_warning's
