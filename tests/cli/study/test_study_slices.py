"""A study's slices of a seconds budget: planned at the latest pace, held to their time limit (the first one
included), run where the system has no load average."""

import json
from pathlib import Path

from tiny_study import _spec

from lomar.cli.study import runner
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
