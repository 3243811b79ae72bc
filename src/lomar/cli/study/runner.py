"""Run a study: every cell an ordinary ``lomar pretrain`` run folder, trained in slices.

Cells of one seed take turns: each call advances one cell by about ``slice`` seconds of
training (``lomar pretrain --resume auto --max-steps N``, N from the cell's measured rate), so
load from other processes on a shared machine falls on every cell alike. The clock of a cell
is its *training* time, summed from its ``metrics.jsonl`` (images per step / img_s of each
step), so start-up, checkpointing and evaluation never count against its budget.

At each evaluation point the cell's ``last.pt`` is scored (``lomar knn``/``linprobe``/
``finetune``, and the masked-reconstruction loss on the held-out images); the point's record
is then written into ``CELL/study-state.json`` atomically, so a killed study redoes at most
the slice or evaluation it was in.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lomar.cli.study.spec import Budget, Cell, StudySpec
from lomar.errors import LomarError, UsageError
from lomar.train.config import PretrainConfig

__all__ = ["run_study", "StudyStopped", "lomar_command", "check_cells"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


class StudyStopped(LomarError):
    """A command was interrupted (Ctrl-C, SIGTERM): the study stops; re-run it to continue."""


def lomar_command(argv: list[str], quiet: bool = True) -> tuple[int, str]:
    """Run ``lomar ARGV`` in this process: (exit code, its captured stdout + stderr)."""
    from lomar.cli.app import main  # the study is itself a command: it may drive the others

    buffer = io.StringIO()
    streams = (contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer)) if quiet else ()
    with contextlib.ExitStack() as stack:
        for stream in streams:
            stack.enter_context(stream)
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse rejects a flag
            rc = exc.code if isinstance(exc.code, int) else 2
    return rc, buffer.getvalue()


def settings_flags(settings: dict[str, Any]) -> list[str]:
    """{'window_size': 5, 'norm_pix_loss': False, 'crop_scale': (0.5, 1.0)}
    -> ['--window-size', '5', '--no-norm-pix-loss', '--crop-scale', '0.5', '1.0']."""
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):  # a multi-value flag (YAML gives a list)
            flags += [flag, *map(str, value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


def check_cells(spec: StudySpec) -> None:
    """Every cell's settings must pass `lomar pretrain --print-config`; else a UsageError naming it."""
    seen = set()
    for cell in spec.cells():
        argv = _pretrain_argv(spec, cell, Path("/nonexistent-study-check")) + ["--print-config"]
        key = tuple(argv)
        if key in seen:
            continue
        seen.add(key)
        rc, text = lomar_command(argv)
        if rc != 0:
            raise UsageError(f"cell '{cell.setting_label}' is not a valid `lomar pretrain` setting: "
                             f"{_last_line(text).removeprefix('lomar pretrain: error: ')}; fix grid/settings")


def _pretrain_argv(spec: StudySpec, cell: Cell, folder: Path) -> list[str]:
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
    argv = ["pretrain", "--out", str(folder), "--resume", "auto", "--seed", str(cell.seed)]
    if spec.data_pretrain:
        argv += ["--data", spec.data_pretrain]
    return argv + settings_flags(settings)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_progress(folder: Path, batch: int) -> tuple[int, float, float | None]:
    """(steps, training seconds, mean loss of the last 10 steps) from a run's metrics.jsonl."""
    path = folder / "metrics.jsonl"
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    seconds = sum(batch / r["img_s"] for r in records if r.get("img_s"))
    tail = [r["loss"] for r in records[-10:]]
    return (records[-1]["step"] if records else 0), seconds, (sum(tail) / len(tail) if tail else None)


@dataclass
class Point:
    key: str  # 'end', 'at-100steps', 'at-15s', 'equal_steps'
    unit: str  # seconds | steps
    value: float


def _points(spec: StudySpec, total: Budget) -> list[Point]:
    """Evaluation points of a cell, in order (``eval.every`` uses the budget's unit); the last
    one is the end of its budget."""
    every, points, k = spec.eval.every, [], 1
    while every is not None and k * every.value < total.value - 1e-9:
        points.append(Point(f"at-{k * every.value:g}{'s' if every.unit == 'seconds' else 'steps'}",
                            every.unit, k * every.value))
        k += 1
    return points + [Point("end", total.unit, total.value)]


class CellRun:
    """A cell's run folder and its study state; ``advance()`` does one slice or one evaluation."""

    def __init__(self, study: Study, cell: Cell, folder: Path, total: Budget, point_kind: str | None = None):
        self.study, self.cell, self.folder, self.total = study, cell, folder, total
        self.point_kind = point_kind  # record every point under this kind (the equal-steps copies)
        self.batch = int(cell.settings.get("batch_size", 64)) * int(cell.settings.get("accum_steps", 1))
        self.state_path = folder / "study-state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else \
            {"points": {}, "slices": 0, "wall_seconds": 0.0, "loads": [], "cell": cell.name}
        if cell.random_init:
            self.points = [Point("end", "steps", 1)]
        elif point_kind is not None or self.study.spec.eval.every is None or total.unit == "epochs":
            self.points = [Point("end", total.unit, total.value)]
        else:
            self.points = _points(study.spec, total)
        if total.unit == "epochs":
            self.points = [Point("end", "steps", total.value * study.steps_per_epoch(self.batch))]

    @property
    def done(self) -> bool:
        return all(p.key in self.state["points"] for p in self.points)

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_json(self.state_path, self.state)

    def advance(self) -> None:
        point = next(p for p in self.points if p.key not in self.state["points"])
        steps, seconds, _ = read_progress(self.folder, self.batch)
        rate = steps / seconds if steps and seconds else None
        if self._reached(point, steps, seconds, rate):
            self._evaluate(point, steps, seconds)
            return
        if point.unit == "steps":
            chunk = max(1, round(rate * self.study.spec.slice_s)) if rate else 2
            target = min(int(point.value), steps + chunk)
        else:
            left = min(self.study.spec.slice_s, point.value - seconds)
            target = steps + (max(1, round(rate * left)) if rate else 2)
        start, load = time.perf_counter(), os.getloadavg()[0]
        argv = _pretrain_argv(self.study.spec, self.cell, self.folder) + ["--max-steps", str(target)]
        rc, text = lomar_command(argv)
        self.state["slices"] += 1
        self.state["wall_seconds"] += time.perf_counter() - start
        self.state["loads"].append(round(load, 2))
        self._save()
        if rc == 130:
            raise StudyStopped(f"interrupted in cell {self.folder.name}; re-run the same command to continue")
        if rc != 0:
            raise LomarError(f"`lomar pretrain` failed in cell {self.folder}: {_last_line(text)}")
        reached, _, _ = read_progress(self.folder, self.batch)
        if reached < target and "lomar: done at step" in text:  # the cell's schedule (--epochs) has ended
            self.state["schedule_end"] = reached
            self._save()
        elif reached < target:  # the engine took a stop signal: checkpointed; the study stops too
            raise StudyStopped(f"pretraining of {self.folder.name} stopped at step {reached} (signal); "
                               f"re-run the same command to continue")

    def _reached(self, point: Point, steps: int, seconds: float, rate: float | None) -> bool:
        if steps > 0 and steps >= self.state.get("schedule_end", float("inf")):
            return True  # no more training: every remaining point is evaluated here
        if point.unit == "steps":
            return steps >= point.value
        half_step = 0.5 / rate if rate else 0.0
        return steps > 0 and seconds >= point.value - half_step

    def _evaluate(self, point: Point, steps: int, seconds: float) -> None:
        _, _, loss = read_progress(self.folder, self.batch)
        loads = self.state["loads"]
        record = {"cell": self.cell.name, "run": str(self.folder), "setting": self.cell.setting_label,
                  "labels": self.cell.labels, "seed": self.cell.seed, "random_init": self.cell.random_init,
                  "point": self.point_kind or point.key, "step": 0 if self.cell.random_init else steps,
                  "train_seconds": 0.0 if self.cell.random_init else round(seconds, 2),
                  "wall_seconds": round(self.state["wall_seconds"], 1), "slices": self.state["slices"],
                  "load_1min": round(sum(loads) / len(loads), 2) if loads else None,
                  "train_loss": None if self.cell.random_init or loss is None else round(loss, 4)}
        same = [r for r in self.state["points"].values() if r["step"] == record["step"]]
        if same:  # a slice overshot several points: the checkpoint is the one already scored
            record.update({m: same[0][m] for m in self.study.spec.eval.metrics})
        else:
            record.update(self.study.evaluate(self, point))
        record["evaluated_at"] = time.time()
        self.state["points"][point.key] = record
        self._save()


class Study:
    """The whole job: cells per seed, interleaved; equal-steps copies; the result files."""

    def __init__(self, spec: StudySpec, out: Path, log: Callable[[str], None] = print):
        self.spec, self.out, self.log = spec, out, log
        self.started = time.perf_counter()
        self.eval_seconds: list[float] = []
        self._per_epoch: dict[int, int] = {}

    def steps_per_epoch(self, batch: int) -> int:
        if batch not in self._per_epoch:
            if not self.spec.data_pretrain:
                raise UsageError("budget in epochs needs data.pretrain (a folder); use seconds or steps for the demo")
            n = sum(1 for p in Path(self.spec.data_pretrain).rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
            self._per_epoch[batch] = max(1, n // batch)
        return self._per_epoch[batch]

    def evaluate(self, run: CellRun, point: Point) -> dict[str, Any]:
        from lomar.cli.study import evals

        result = {}
        checkpoint = run.folder / "last.pt"
        for metric in self.spec.eval.metrics:
            self.log(f"[study] {run.folder.name}: {metric} at step {read_progress(run.folder, run.batch)[0]} "
                     f"({self.time_left()})")
            start = time.perf_counter()
            result[metric] = evals.run_metric(metric, self.spec, run.cell, checkpoint,
                                              run.folder / "evals" / f"{point.key}-{metric}")
            self.eval_seconds.append(time.perf_counter() - start)
        return result

    def time_left(self) -> str:
        """A rough estimate: remaining training time of all cells + remaining evaluations."""
        runs = getattr(self, "runs", [])
        train_left, evals_left = 0.0, 0
        for run in runs:
            _, seconds, _ = read_progress(run.folder, run.batch)
            if run.total.unit == "seconds" and not run.cell.random_init:
                train_left += max(0.0, run.total.value - seconds)
            evals_left += sum(p.key not in run.state["points"] for p in run.points) * len(self.spec.eval.metrics)
        per_eval = sum(self.eval_seconds) / len(self.eval_seconds) if self.eval_seconds else 5.0
        left = train_left * 1.3 + evals_left * per_eval
        return f"~{left / 60:.1f} min left for this seed, {(time.perf_counter() - self.started) / 60:.1f} min so far"

    def run_seed(self, cells: list[Cell]) -> list[CellRun]:
        self.runs = [CellRun(self, c, self.out / "cells" / c.name, self.spec.budget) for c in cells]
        self._interleave()
        finished = list(self.runs)
        if self.spec.eval.equal_steps:
            finished += self._equal_steps()
        return finished

    def _interleave(self) -> None:
        while not all(r.done for r in self.runs):
            for run in self.runs:
                if run.done:
                    continue
                steps, seconds, _ = read_progress(run.folder, run.batch)
                done = "random init, 1 step at lr 0" if run.cell.random_init else \
                    f"step {steps}, {seconds:.0f}s/{run.total} trained" if run.total.unit == "seconds" else \
                    f"step {steps}/{run.points[-1].value:g}, {seconds:.0f}s trained"
                self.log(f"[study] {run.folder.name}: {done} ({self.time_left()})")
                run.advance()

    def _equal_steps(self) -> list[CellRun]:
        """The cells at the step count of the slowest one (their own run at ``N`` steps: a copy
        trained to exactly N steps with the same seed and settings, evaluated there)."""
        trained = [r for r in self.runs if not r.cell.random_init]
        if len(trained) < 2:
            return []
        ends = {r.cell.name: r.state["points"]["end"]["step"] for r in trained}
        n = min(ends.values())
        copies = []
        for run in trained:
            if ends[run.cell.name] == n:  # this cell *is* at N steps: its end record serves
                if "equal_steps" not in run.state["points"]:
                    run.state["points"]["equal_steps"] = {**run.state["points"]["end"], "point": "equal_steps"}
                    run._save()
                continue
            copies.append(CellRun(self, run.cell, self.out / "cells" / f"{run.cell.name}@{n}steps",
                                  Budget(n, "steps"), point_kind="equal_steps"))
        self.runs = copies
        self._interleave()
        return copies

    def run(self) -> list[dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        records = []
        cells = self.spec.cells()
        for seed in self.spec.seeds:
            for run in self.run_seed([c for c in cells if c.seed == seed]):
                records += [dict(rec) for rec in run.state["points"].values()]
        return records


def run_study(spec: StudySpec, out: str | Path, log: Callable[[str], None] | None = None,
              command: str | None = None) -> list[dict[str, Any]]:
    """Run (or continue) the study; writes results.json, results.md and the figures into ``out``."""
    from lomar.cli.study.figures import write_figures
    from lomar.cli.study.results import write_results

    out = Path(out)
    log = log or (lambda line: print(line, flush=True))
    check_cells(spec)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "spec.json", {"name": spec.name, "budget": str(spec.budget), "seeds": spec.seeds,
                                    "settings": spec.settings, "grid": {a: v for a, v in spec.grid.items()},
                                    "eval": {k: (str(v) if isinstance(v, Budget) else v)
                                             for k, v in vars(spec.eval).items()}})
    study = Study(spec, out, log)
    records = study.run()
    figures = write_figures(records, spec, out)
    write_results(records, spec, out, figures, minutes=(time.perf_counter() - study.started) / 60,
                  command=command)
    log(f"[study] done: {out / 'results.md'}, {out / 'results.json'}, {len(figures)} figure(s)")
    return records
