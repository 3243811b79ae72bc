"""A study's slices of a seconds budget (planned at the latest pace, held to their time limit, the first one
included, where the system has no load average) and the notes its cells' commands say once a study."""

import json
from pathlib import Path

import pytest
from tiny_study import _spec

from lomar.cli.study import runner
from lomar.cli.study.runner import run_study
from lomar.cli.study.spec import parse_spec


def _lomar_cell(tmp_path: Path, labelled: Path, **changes) -> runner.CellRun:
    """The run of a one-cell study (lomar, no random init, no evaluation), its folder made, to advance by hand."""
    spec = parse_spec(_spec(labelled, grid={"method": ["lomar"]}, random_init=False, eval={"metrics": []}, **changes))
    cell = spec.cells()[0]
    run = runner.CellRun(runner.Study(spec, tmp_path), cell, tmp_path / "cells" / cell.name, spec.budget)
    run.folder.mkdir(parents=True)
    return run


def test_a_seconds_budgets_next_slice_is_planned_at_the_latest_slices_pace(tmp_path, labelled, monkeypatch):
    """A machine twice as busy since the second of three 10 s slices (80 steps of 1/8 s, then 40 of 1/4 s): the
    mean pace over the run planned the last slice to step 180, 15 s at the pace it trains at, 5 s (17 %) past the
    30 s budget."""
    run = _lomar_cell(tmp_path, labelled, budget="30s", slice="10s")
    records = [{"step": i + 1, "loss": 1.0, "img_s": run.batch / t} for i, t in enumerate([0.125] * 80 + [0.25] * 40)]
    (run.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    planned = []

    def slice_at_its_pace(config):
        planned.append(config.max_steps)
        more = [{"step": s, "loss": 1.0, "img_s": run.batch / 0.25} for s in range(121, config.max_steps + 1)]
        with open(run.folder / "metrics.jsonl", "a") as file:
            file.writelines(json.dumps(r) + "\n" for r in more)
        return 0

    monkeypatch.setattr(runner, "pretrain", slice_at_its_pace)
    run.advance()
    assert planned == [160]  # not 180
    assert sum(runner.read_progress(run.folder, run.batch)[1]) == 30.0


def test_a_slice_that_the_machine_slows_is_stopped_by_its_time_limit_and_the_cell_goes_on(tmp_path, labelled,
                                                                                     monkeypatch):
    """Planned at 8 steps a second, the 10 s slice trains at 2 (the machine 4 times busier since it started): its
    --time-limit stops it near its plan instead of after 40 s of training at the target step, and the study takes
    that stop for the end of a slice, not a signal. The limit: 10 s, the least 3 s of start-up and save a slice took,
    and what the run keeps inside it, one more step (1/8 s) and the save as estimated from the 3 kB checkpoint (3 s at
    1 kB/s, and 2 s); without those two, the run would stop 5 s short of its plan on an unslowed machine."""
    from lomar.train import preemption

    monkeypatch.setattr(preemption, "SAVE_BYTES_PER_S", 1000)
    run = _lomar_cell(tmp_path, labelled, budget="30s", slice="10s")
    records = [{"step": i + 1, "loss": 1.0, "img_s": run.batch / 0.125} for i in range(80)]
    (run.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run.state.update(slices=1, wall_seconds=13.0, overhead_s=3.0)
    (run.folder / "last.pt").write_bytes(bytes(3000))
    planned = []

    def slice_slowed(config):  # 0.5 s a step: the limit less start-up and the step and save kept leave 20 steps
        planned.append((config.max_steps, config.time_limit))
        with open(run.folder / "metrics.jsonl", "a") as file:
            file.writelines(json.dumps({"step": s, "loss": 1.0, "img_s": run.batch / 0.5}) + "\n"
                            for s in range(81, 101))
        return 75

    monkeypatch.setattr(runner, "pretrain", slice_slowed)
    run.advance()
    assert planned == [(160, 19)] and run.state["slices"] == 2 and not run.done  # not 13


def test_the_first_slice_of_a_seconds_budget_has_a_time_limit_counted_from_its_call(tmp_path, labelled, monkeypatch):
    """No slice measured yet: the first gets its 10 s as its --time-limit (it had none, and a machine that runs its
    first steps slowly trained them unbounded), counted from the slice's call, not from the study's start."""
    from lomar.train import preemption

    run = _lomar_cell(tmp_path, labelled, budget="30s", slice="10s")
    planned = []

    def first_slice(config):
        planned.append((config.max_steps, config.time_limit, preemption.take_command_start()))
        with open(run.folder / "metrics.jsonl", "a") as file:
            file.writelines(json.dumps({"step": s, "loss": 1.0, "img_s": run.batch / 0.5}) + "\n" for s in (1, 2))
        return 0

    monkeypatch.setattr(runner, "pretrain", first_slice)
    preemption.mark_command_start(preemption.monotonic() - 60.0)  # `lomar study` began a minute ago
    try:
        run.advance()
    finally:
        preemption.take_command_start()
    assert planned == [(2, 10, None)] and run.state["slices"] == 1  # not (2, None, ...)


def test_a_cells_notes_are_said_once_not_at_each_slice_and_evaluation(tmp_path, labelled, pretrained, monkeypatch,
                                                                       capsys):
    """'lomar pretrain: note: --window-size 3 is unused' of an MAE cell is said once a study, not at the check, each
    cell's start and each of its slices (57 times in a study of 8 MAE cells); the finetune's warm-up note once too,
    not at each evaluation."""
    from lomar.cli.study import evals
    from lomar.cli.study.spec import Cell, StudyFailed
    from lomar.train import finetune_config
    from lomar.train.task import TrainingError

    steps: dict[str, int] = {}

    def slice_to_its_target(config):
        steps[str(config.out)] = config.max_steps
        return 0

    monkeypatch.setattr(runner, "read_progress", lambda folder, batch: (steps.get(str(folder), 0), [1.0], 0.5))
    monkeypatch.setattr(runner, "pretrain", slice_to_its_target)
    grid = {"method": ["lomar", {"label": "mae", "method": "mae", "windows": 0}]}
    spec = _spec(labelled, budget="3steps", seeds=2, grid=grid, random_init=False, eval={"metrics": []})
    run_study(parse_spec(spec), tmp_path / "study", log=lambda line: None)
    assert capsys.readouterr().err == ("lomar pretrain: note: --window-size 3 is unused: this --method mae run has no "
                                       "windows (--windows 0: the whole image)\n")
    spec = parse_spec(_spec(labelled, eval={"metrics": ["finetune"], "finetune": {"epochs": 1, "batch_size": 4}}))
    said = runner.check_cells(spec)
    assert capsys.readouterr().err.count("lomar finetune: note: warming up") == 1
    monkeypatch.setattr(evals, "finetune", lambda config: (_ for _ in ()).throw(TrainingError("stop")))
    args = evals._args("finetune", spec, Cell({}, dict(spec.settings), 0), pretrained, tmp_path / "f")
    with pytest.raises(StudyFailed):
        evals._finetune(args, said)
    assert capsys.readouterr().err == ""
    # A BEiT cell's finetune takes BEiT's recipe (20 warm-up epochs): its own note, which the check cannot know of,
    # is said at its first evaluation, once.
    monkeypatch.setattr(finetune_config, "_is_beit", lambda pretrained: True)
    for _ in range(2):
        with pytest.raises(StudyFailed):
            evals._finetune(args, said)
    assert capsys.readouterr().err == ("lomar finetune: note: warming up for all 1 epoch(s) (the default 20 is longer "
                                       "than --epochs)\n")


def test_a_finetunes_start_notes_are_said_once_a_study_and_its_other_lines_each_time(tmp_path, labelled, pretrained,
                                                                                    monkeypatch, capsys):
    """eval.finetune's 'lomar finetune: note: --train-pos-embed is unused', which the finetune says at its start (it
    needs the encoder: a LoMaR cell's has no position table), is said once a study, not at every cell's evaluation;
    its other lines (a warning) are said each time."""
    import sys

    import torch

    from lomar.cli.study import evals
    from lomar.cli.study.spec import Cell, StudyFailed
    from lomar.train import finetune
    from lomar.train.distributed import DistInfo
    from lomar.train.task import TrainingError

    def start(config, make_task):  # the run's start: its task built (the encoder, its notes), then stopped
        make_task(config, DistInfo(), torch.device("cpu"))
        print("lomar finetune: warning: not a note", file=sys.stderr, flush=True)
        raise TrainingError("stop")

    monkeypatch.setattr(finetune, "run", start)
    spec = parse_spec(_spec(labelled, eval={"metrics": ["finetune"], "finetune": {"epochs": 1, "batch_size": 4,
                                                                                  "train_pos_embed": True}}))
    said = runner.check_cells(spec)
    capsys.readouterr()
    for where in ("f1", "f2"):  # two cells' evaluations
        args = evals._args("finetune", spec, Cell({}, dict(spec.settings), 0), pretrained, tmp_path / where)
        with pytest.raises(StudyFailed):
            evals._finetune(args, said)
    again = "lomar finetune: warning: not a note\n"
    assert capsys.readouterr().err == ("lomar finetune: note: --train-pos-embed is unused: it acts on an absolute "
                                       "position table (MAE's), and this encoder has none\n" + again + again)


def test_a_slice_runs_where_the_system_has_no_load_average(tmp_path, labelled, monkeypatch):
    """Windows has no os.getloadavg: the slice trains and its cell's records say no load (an AttributeError before)."""
    monkeypatch.delattr("os.getloadavg")
    run = _lomar_cell(tmp_path, labelled, budget="4steps")

    def a_slice(config):
        with open(run.folder / "metrics.jsonl", "a") as file:
            file.writelines(json.dumps({"step": s, "loss": 1.0, "img_s": 8.0}) + "\n" for s in range(1, 5))
        return 0

    monkeypatch.setattr(runner, "pretrain", a_slice)
    run.advance()
    assert run.state["slices"] == 1 and run.state["loads"] == []
