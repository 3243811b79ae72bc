"""Run a study: every cell an ordinary ``lomar pretrain`` run folder, trained in slices.

A cell's settings resolve to its PretrainConfig through ``lomar pretrain``'s own flags (``--resume auto``); a slice
is the pretraining library call with ``--max-steps N``, and what it did is read back from the run folder
(``metrics.jsonl``), never from what it printed. Cells of one seed take turns by slices of about ``slice`` seconds,
so load from other processes falls on every cell alike; a cell's clock is its *training* time (images per step /
img_s of each step), so start-up, checkpointing and evaluation never count against its budget. No slice goes past
the end of the cell's own schedule (its epochs): one that stops short of its target was signalled. Each evaluation
point's record goes into ``CELL/study-state.json`` atomically, so a killed study redoes at most the slice or
evaluation it was in. At the end: results.json (one record per cell x evaluation point), results.md (paper-like
tables) and the figures: accuracy against pretraining time per setting (the paper's Fig. 3) and one bar chart per
ablation (the metrics at the end of the budget, mean ± sd over seeds), drawn by :mod:`lomar.viz.study`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lomar.bench.host import load_average
from lomar.checkpoints.file_names import LAST
from lomar.cli.common import write_json
from lomar.cli.study.evals import Scorer, check_options
from lomar.cli.study.flags import parse_flags, settings_flags
from lomar.cli.study.progress import pace, read_progress
from lomar.cli.study.results import write_results
from lomar.cli.study.spec import (
    Budget,
    Cell,
    StudyFailed,
    StudySpec,
    StudyStopped,
    cell_run_fits,
    stop_signals_seen,
)
from lomar.data.folder import build_pretrain_dataset
from lomar.errors import UsageError
from lomar.train.config import PretrainConfig, add_config_arguments, resolve_config
from lomar.train.preemption import TIME_LIMIT_EXIT, first_save_estimate, take_command_start
from lomar.train.pretrain import train
from lomar.train.run_lock import RunLock
from lomar.train.run_state import SaveError
from lomar.train.task import TrainingError
from lomar.values import counted

__all__ = ["run_study", "check_cells", "cell_config", "pretrain"]


def cell_config(spec: StudySpec, cell: Cell, folder: Path, max_steps: int | None = None, check: bool = False,
                notes: dict[str, None] | None = None, time_limit: int | None = None):
    """The cell's PretrainConfig, resolved as ``lomar pretrain --out FOLDER --resume auto ...`` would (``check``: as
    ``--print-config``, which does not look into ``--out``); its notes go into ``notes``, said once by check_cells.
    ``time_limit``: the slice's ``--time-limit`` (None: none, not the previous slice's, which a resume would keep)."""
    settings = dict(cell.settings)
    if cell.random_init:  # one step at lr 0 (the first warm-up step) leaves the initialisation as it was
        settings.update(warmup_epochs=1e-3)
    if spec.budget.unit == "epochs" and "epochs" not in spec.settings:
        settings["epochs"] = int(spec.budget.value)
    elif not {"epochs", "schedule_steps"} & set(settings):
        # Each slice passes --max-steps: the schedule must not be laid over the first slice.
        if spec.budget.unit == "steps":
            settings["schedule_steps"] = int(spec.budget.value)
        else:
            settings["epochs"] = PretrainConfig.epochs
    settings.update(out=str(folder), resume="auto", seed=cell.seed, data=spec.data_pretrain, max_steps=max_steps,
                    time_limit=time_limit or "none")
    argv = settings_flags(settings) + ["--print-config"] * check
    with contextlib.redirect_stderr(io.StringIO()) as said:  # not at each slice of each cell
        config = resolve_config(parse_flags(add_config_arguments, argv))
    if notes is not None:
        notes.update(dict.fromkeys(said.getvalue().splitlines()))
    return config


@functools.cache
def _dataset_size(data: str | None, img_size: int) -> int:
    dataset = build_pretrain_dataset(data, img_size)
    return dataset.count_samples() if hasattr(dataset, "count_samples") else len(dataset)


def steps_per_epoch(config) -> int:
    """Optimizer steps in an epoch of the config's data on one process, as the engine counts them."""
    size = _dataset_size(config.data, config.img_size)
    steps = size // config.batch_size // config.accum_steps
    if steps == 0:
        raise UsageError(f"{counted(size, 'image')} cannot fill one step of batch {config.batch_size} x accum "
                         f"{config.accum_steps}; lower batch_size in the study's settings")
    return steps


def check_cells(spec: StudySpec) -> dict[str, None]:
    """Every cell's settings and every evaluation's options must be valid; else a UsageError naming them. Their notes
    are said once, here, and returned: an evaluation says only a note of its own (a BEiT cell's finetune recipe)."""
    spec.check_folders()
    notes: dict[str, None] = {}
    for cell in {json.dumps(c.settings, sort_keys=True, default=str): c for c in spec.cells()}.values():
        try:
            steps_per_epoch(cell_config(spec, cell, Path("/nonexistent-study-check"), check=True, notes=notes))
        except (UsageError, ValueError) as exc:
            raise UsageError(f"cell '{cell.setting_label}' is not a valid `lomar pretrain` setting: {exc}; "
                             f"fix the study's data, grid or settings") from None
    with contextlib.redirect_stderr(io.StringIO()) as said:
        check_options(spec)
    notes.update(dict.fromkeys(said.getvalue().splitlines()))
    sys.stderr.write("".join(f"{note}\n" for note in notes))
    return notes


def pretrain(config) -> int:
    """One slice of a cell: the pretraining library call (its printed progress silenced: the
    study reads the run folder); the exit code ``lomar pretrain`` would return."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            return train(config)
        except (TrainingError, SaveError) as exc:
            raise StudyFailed(f"pretraining in {config.out} failed: {exc}") from None


def cell_spec(spec: StudySpec, cell: Cell, total: Budget) -> dict[str, Any]:
    """What a cell's records depend on, as JSON gives it back: its settings, budget, data and evaluations
    (not the slice length, the seeds or the other cells)."""
    ev = {k: str(v) if isinstance(v, Budget) else v for k, v in vars(spec.eval).items() if k != "equal_steps"}
    data = {"pretrain": spec.data_pretrain, "train": spec.data_train, "val": spec.data_val}
    data = {k: v and os.path.abspath(v) for k, v in data.items()}  # --data sep and --data ./sep are one folder
    return json.loads(json.dumps({"settings": cell.settings, "budget": str(total), "eval": ev, "data": data},
                                 default=str))


def check_same_spec(state: dict, spec: StudySpec, cell: Cell, folder: Path, total: Budget) -> None:
    """A cell folder holds the runs and scores of the spec it was started with: a re-run with another
    budget, setting, data or evaluation would skip its finished points (or score them at the wrong step)
    and show the old numbers as the new spec's; a UsageError naming the first difference instead."""
    if "spec" not in state:  # started before cells recorded their spec
        return
    had, now = _flat(state["spec"]), _flat(cell_spec(spec, cell, total))
    key = next((k for k in sorted(set(had) | set(now)) if had.get(k) != now.get(k)), None)
    if key is not None:
        shown = [json.dumps(v) if v is not None else "unset" for v in (had.get(key), now.get(key))]
        raise UsageError(f"cell {folder.name} in {folder.parent.parent} was run with {key} {shown[0]}, the "
                         f"spec now gives {shown[1]}; restore the spec (or flags), pass another --out, or delete "
                         f"{folder} to redo that cell")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'eval': {'knn': {'k': 3}}} -> {'eval.knn.k': 3}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):  # an empty one adds no key: {} and a missing mapping are the same
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class CellRun:
    """A cell's run folder and its study state; ``advance()`` does one slice or one evaluation."""

    def __init__(self, study: Study, cell: Cell, folder: Path, total: Budget, point_kind: str | None = None):
        self.study, self.cell, self.folder, self.total = study, cell, folder, total
        self.point_kind = point_kind  # record every point under this kind (the equal-steps copies)
        with cell_run_fits(cell.name, folder):
            config = cell_config(study.spec, cell, folder, check=True)
        self.batch, per_epoch = config.batch_size * config.accum_steps, steps_per_epoch(config)
        self.end = config.epochs * per_epoch  # where the cell's own schedule ends
        if config.schedule_steps and self.end < config.schedule_steps and not cell.random_init:  # lr never annealed
            raise UsageError(f"cell {cell.name}: its {config.epochs} epochs of {per_epoch} steps end at step "
                             f"{self.end}, before its {config.schedule_steps}-step lr schedule; add epochs: "
                             f"{-(-config.schedule_steps // per_epoch)} and schedule_steps: {config.schedule_steps} "
                             f"to the spec's settings, or lower the budget")
        self.state_path = folder / "study-state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else \
            {"points": {}, "slices": 0, "wall_seconds": 0.0, "loads": [], "cell": cell.name}
        check_same_spec(self.state, study.spec, cell, folder, total)
        self.state["spec"] = cell_spec(study.spec, cell, total)
        every, steps = study.spec.eval.every, cell.random_init or total.unit == "epochs"
        end = 1 if cell.random_init else total.value * per_epoch if total.unit == "epochs" else total.value
        self.points: dict[str, Budget] = {}  # 'at-100steps', 'at-15s', ..., 'end': where each is evaluated
        k = 1  # evaluation points along the way, in ``eval.every``'s unit (the budget's)
        while every is not None and point_kind is None and not steps and k * every.value < total.value - 1e-9:
            suffix = "s" if every.unit == "seconds" else "steps"
            self.points[f"at-{k * every.value:g}{suffix}"] = Budget(k * every.value, every.unit)
            k += 1
        self.points["end"] = Budget(end, "steps" if steps else total.unit)

    @property
    def done(self) -> bool:
        return all(key in self.state["points"] for key in self.points)

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.state_path, self.state)

    def advance(self) -> None:
        key, point = next((k, p) for k, p in self.points.items() if k not in self.state["points"])
        steps, times, _ = read_progress(self.folder, self.batch)
        seconds, rate = sum(times), pace(times, self.study.spec.slice_s)
        if steps >= self.end or (steps >= point.value if point.unit == "steps" else
                                 steps > 0 and seconds >= point.value - (0.5 / rate if rate else 0.0)):
            return self._evaluate(key, steps, seconds)  # past the schedule's end: every point is evaluated here
        left = self.study.spec.slice_s if point.unit == "steps" else min(self.study.spec.slice_s, point.value - seconds)
        target = min(steps + (max(1, round(rate * left)) if rate else 2), self.end)
        target = min(target, int(point.value)) if point.unit == "steps" else target
        # The time limit stops a slice that the machine slows past its plan: its seconds and the least wall time a
        # slice of the cell spent on all but training (start-up, which the limit counts, and the final save). Short of
        # the start-up, the slice ends early and the next one trains the rest; past it, the cell trains past its plan.
        # The first slice, none measured yet, gets its seconds alone: unbounded, a slow machine's first steps (or
        # compiling) could take many times the slice; bounded, it ends early and the next slice trains the rest.
        # The run keeps one more step and its save (estimated: a slice saves at its end) inside its limit, which the
        # overhead holds already: both are added back, else each slice stops seconds short of its plan, and one
        # planned shorter than the estimate trains a single step, the cell's end taking a slice a step.
        saved, reserve = self.folder / LAST, 0.0
        if "overhead_s" in self.state:  # a slice ran: the checkpoint it saved sizes the estimate
            reserve = (1 / rate if rate else 0.0) + first_save_estimate(saved.stat().st_size if saved.exists() else 0)
        limit = math.ceil(left + self.state.get("overhead_s", 0.0) + reserve) if point.unit == "seconds" else None
        take_command_start()  # the slice's limit counts from its call, as its overhead is measured, not from lomar's
        start, load = time.perf_counter(), load_average()
        with stop_signals_seen() as signals:
            rc = pretrain(cell_config(self.study.spec, self.cell, self.folder, max_steps=target, time_limit=limit))
        wall = time.perf_counter() - start
        reached, times, _ = read_progress(self.folder, self.batch)
        self.state["slices"] += 1
        self.state["wall_seconds"] += wall
        overhead = round(max(0.0, wall - (sum(times) - seconds)), 2)  # the wall time the slice did not train
        self.state["overhead_s"] = min(self.state.get("overhead_s", overhead), overhead)
        if load is not None:  # None on Windows
            self.state["loads"].append(round(load[0], 2))
        self._save()
        timed_out = rc == TIME_LIMIT_EXIT and reached > steps
        if rc == 130 or signals or (reached < target and not timed_out):  # a stop signal: the study stops too
            raise StudyStopped(f"pretraining of {self.folder.name} stopped at step {reached} (signal); "
                               f"re-run the same command to continue", signals)
        if rc not in (0, TIME_LIMIT_EXIT):
            raise StudyFailed(f"pretraining in {self.folder} ended with exit code {rc}")

    def _evaluate(self, key: str, steps: int, seconds: float) -> None:
        loss, loads, random = read_progress(self.folder, self.batch)[2], self.state["loads"], self.cell.random_init
        record = {"cell": self.cell.name, "run": str(self.folder), "setting": self.cell.setting_label,
                  "labels": self.cell.labels, "seed": self.cell.seed, "random_init": random,
                  "point": self.point_kind or key, "step": 0 if random else steps,
                  "train_seconds": 0.0 if random else round(seconds, 2),
                  "wall_seconds": round(self.state["wall_seconds"], 1), "slices": self.state["slices"],
                  "load_1min": round(sum(loads) / len(loads), 2) if loads else None,
                  "train_loss": None if random or loss is None else round(loss, 4)}
        same = [r for r in self.state["points"].values() if r["step"] == record["step"]]
        if same:  # a slice overshot several points: the checkpoint is the one already scored
            record.update({m: same[0][m] for m in self.study.spec.eval.metrics})
        else:
            score = Scorer(self.study.spec, self.cell, self.folder / LAST, self.folder / "evals" / key, self.study.said)
            for metric in self.study.spec.eval.metrics:
                self.study.log(f"[study] {self.folder.name}: {metric} at step {steps} ({self.study.time_left()})")
                start = time.perf_counter()
                record[metric] = score(metric)
                self.study.eval_seconds.append(time.perf_counter() - start)
        record["evaluated_at"] = time.time()
        self.state["points"][key] = record
        self._save()


class Study:
    """The whole job: cells per seed, interleaved; equal-steps copies; the result files."""

    def __init__(self, spec: StudySpec, out: Path, log: Callable[[str], None] = print, said: dict | None = None):
        self.spec, self.out, self.log, self.started = spec, out, log, time.perf_counter()
        self.said: dict[str, None] = {} if said is None else said  # the notes said so far
        self.eval_seconds: list[float] = []
        self.runs: list[CellRun] = []

    def time_left(self) -> str:
        """A rough estimate: remaining training time of all cells + remaining evaluations."""
        train_left, evals_left = 0.0, 0
        for run in self.runs:
            if run.total.unit == "seconds" and not run.cell.random_init:
                train_left += max(0.0, run.total.value - sum(read_progress(run.folder, run.batch)[1]))
            evals_left += sum(key not in run.state["points"] for key in run.points) * len(self.spec.eval.metrics)
        per_eval = sum(self.eval_seconds) / len(self.eval_seconds) if self.eval_seconds else 5.0
        left = train_left * 1.3 + evals_left * per_eval
        return f"~{left / 60:.1f} min left for this seed, {(time.perf_counter() - self.started) / 60:.1f} min so far"

    def _interleave(self) -> None:
        while not all(r.done for r in self.runs):
            for run in [r for r in self.runs if not r.done]:
                steps, times, _ = read_progress(run.folder, run.batch)
                seconds = sum(times)
                done = "random init, 1 step at lr 0" if run.cell.random_init else \
                    f"step {steps}, {seconds:.0f}s/{run.total} trained" if run.total.unit == "seconds" else \
                    f"step {steps}/{run.points['end'].value:g}, {seconds:.0f}s trained"
                self.log(f"[study] {run.folder.name}: {done} ({self.time_left()})")
                run.advance()

    def _equal_steps(self) -> list[dict[str, Any]]:
        """The records at the step count N of this seed's slowest cell: its end record, and each other cell's own
        run at N steps (a copy trained to exactly N steps with the same seed and settings, evaluated there). Made
        anew each time, never kept in a cell's state: N changes when the grid grows."""
        trained = [r for r in self.runs if not r.cell.random_init]
        if len(trained) < 2:
            return []
        n = min(r.state["points"]["end"]["step"] for r in trained)
        self.runs = [CellRun(self, run.cell, self.out / "cells" / f"{run.cell.name}@{n}steps", Budget(n, "steps"),
                             point_kind="equal_steps") for run in trained if run.state["points"]["end"]["step"] > n]
        self._interleave()
        copies = {run.cell.name: run for run in self.runs}  # the rows in the study's order, as in the other tables
        return [dict(copies[r.cell.name].state["points"]["end"]) if r.cell.name in copies else
                {**r.state["points"]["end"], "point": "equal_steps"} for r in trained]

    def run(self) -> list[dict[str, Any]]:
        records, cells = [], self.spec.cells()
        for seed in self.spec.seeds:
            self.runs = [CellRun(self, c, self.out / "cells" / c.name, self.spec.budget)
                         for c in cells if c.seed == seed]
            self._interleave()
            # a cell's own points; 'equal_steps' kept in its state by an earlier lomar may be of another N
            records += [dict(rec) for run in self.runs for key, rec in run.state["points"].items()
                        if key != "equal_steps"]
            records += self._equal_steps() if self.spec.eval.equal_steps else []
        return records


def run_study(spec: StudySpec, out: str | Path, log: Callable[[str], None] | None = None,
              command: str | None = None) -> list[dict[str, Any]]:
    """Run (or continue) the study; writes results.json, results.md and the figures into ``out``."""
    out = Path(out)
    log = log or (lambda line: print(line, flush=True))
    said = check_cells(spec)
    # Each cell's run folder is locked while it trains, not the study's: a second study into the same
    # folder would score the same cells again and overwrite the first one's states and results.
    with RunLock(out):
        for cell in spec.cells():  # before spec.json is replaced, or a refused re-run would leave the new spec
            state = out / "cells" / cell.name / "study-state.json"
            if state.exists():
                check_same_spec(json.loads(state.read_text()), spec, cell, state.parent, spec.budget)
        write_json(out / "spec.json", {"name": spec.name, "budget": str(spec.budget), "seeds": spec.seeds,
                                       "settings": spec.settings, "grid": spec.grid,
                                       "eval": {k: str(v) if isinstance(v, Budget) else v
                                                for k, v in vars(spec.eval).items()}})
        study = Study(spec, out, log, said)
        records = study.run()
        figures = write_results(records, spec, out, (time.perf_counter() - study.started) / 60, command)
    log(f"[study] done: {out / 'results.md'}, {out / 'results.json'}, {len(figures)} figure(s)")
    return records
