"""The study specification: a typed, validated description of a grid of pretraining cells.

A spec (YAML or dict)::

    name: windows
    data: {pretrain: imgs/, train: labelled/train, val: labelled/val}   # any may be null; relative
                           # to the spec file's folder, not the working directory
    out: runs/windows      # the study's folder (default: studies/NAME in the working directory);
                           # relative to the spec file's folder too, as compose files and make do
    budget: 60s            # per cell: '60s', '2min', '500steps' or '3epochs'
    seeds: 3               # or a list, e.g. [0, 1, 2]
    slice: 10s             # cells of one seed take turns training in slices of this length
    settings: {img_size: 32, patch_size: 4}          # `lomar pretrain` settings shared by all cells
    grid:                  # the cartesian product of the axes; a mapping value sets several keys
      method: [lomar, mae]
      window: [{label: '5:8', window_size: 5, windows: 8}, ...]
    random_init: true      # add a randomly initialised encoder as a baseline row
    eval:
      every: 15s           # evaluation points along the way ('N steps' or 'T s'); the end always
      equal_steps: true    # also compare the cells at the same number of steps (see runner)
      metrics: [knn, linprobe, finetune, heldout_loss]
      finetune: {epochs: 10, blr: 1e-3}               # any `lomar finetune` flag, fixed a priori

Every mistake is a :class:`lomar.errors.UsageError` naming the key and the fix.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lomar.errors import LomarError, UsageError
from lomar.train.preemption import STOP_SIGNALS
from lomar.train.settings_resume import ResumeMismatch
from lomar.values import counted, is_integer
from lomar.yaml_io import read_settings

__all__ = ["Budget", "Cell", "EvalSpec", "StudySpec", "parse_budget", "parse_spec", "load_spec", "METRICS",
           "MAX_SEEDS", "MAX_CELLS", "StudyStopped", "StudyFailed", "stop_signals_seen"]

METRICS = ("knn", "linprobe", "finetune", "heldout_loss")
_UNITS = {"s": "seconds", "sec": "seconds", "seconds": "seconds", "min": "minutes", "m": "minutes",
          "step": "steps", "steps": "steps", "epoch": "epochs", "epochs": "epochs"}
_TOP_KEYS = {"name", "out", "data", "budget", "seeds", "slice", "settings", "grid", "random_init", "eval"}
# Settings the study itself controls for every cell: a spec that sets them would break the
# clock, the resume or the folder layout.
_RESERVED = {"out", "resume", "overwrite", "max_steps", "seed", "data", "config", "print_config"}
# Bounds on what one study may ask for, checked before anything is built from it.
MAX_SEEDS = 100
MAX_CELLS = 1000


class StudyStopped(LomarError):
    """A run was interrupted (Ctrl-C, SIGTERM, SIGUSR1): the study stops; re-run it to continue. It exits
    128 + ``signum``, as a command stopped outside a training loop does (130, 143, 138)."""

    def __init__(self, message: str, signals: list[int] | None = None):
        super().__init__(message)
        self.signum = signals[-1] if signals else int(signal.SIGINT)  # none seen: the run's own Ctrl-C (exit 130)


class StudyFailed(LomarError):
    """A cell's training or finetuning failed on its way (a non-finite loss, too many unreadable images): exit 1,
    as the command itself exits, not 2, which says that nothing was computed."""



@contextlib.contextmanager
def stop_signals_seen() -> Iterator[list[int]]:
    """The stop signals (Ctrl-C, SIGTERM, SIGUSR1) that arrived while the block ran, whichever Python handler
    took them. A training run heeds one only between its steps: one that comes during its last step or its
    final checkpoint and figures (most of a short slice) leaves the run complete and exit 0, and the study,
    seeing a finished slice, would go on as if it had never been sent. Python writes every handled signal's
    number to the wakeup fd, so the study reads them there."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield seen
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    try:
        yield seen
    finally:
        signal.set_wakeup_fd(previous)
        with contextlib.suppress(BlockingIOError):
            seen.extend(sig for sig in os.read(read, 4096) if sig in STOP_SIGNALS)
        os.close(read)
        os.close(write)


@contextlib.contextmanager
def cell_run_fits(name: str, folder: Path) -> Iterator[None]:
    """A cell's run that the study's own settings for it do not continue, in one line for the study: pretrain's
    'drop --schedule-steps' names a flag the study passes itself (a steps budget set no schedule_steps before
    3 Dec 2026: such a cell has none recorded)."""
    try:
        yield
    except ResumeMismatch as exc:
        raise UsageError(f"cell {name} in {folder.parent.parent} holds a run trained with {exc.name}: {exc.had} "
                         f"({exc.source}), which the spec as this lomar runs it gives {exc.given}: the cell was "
                         f"started by an older lomar or under another spec; pass another --out, or delete {folder} "
                         f"to redo that cell") from None


@dataclass(frozen=True)
class Budget:
    """An amount of pretraining: ``unit`` is 'seconds', 'steps' or 'epochs'."""

    value: float
    unit: str

    def __str__(self) -> str:
        if self.unit == "seconds":
            return f"{self.value:g}s"
        return counted(int(self.value), self.unit.removesuffix("s"))


def parse_budget(text: Any, key: str) -> Budget:
    """'30s', '2min', '200steps', '200 steps', '3epochs' -> Budget; UsageError naming ``key``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*", str(text).lower())
    unit = _UNITS.get(match.group(2)) if match else None
    if unit is None:
        raise UsageError(f"{key}: {text!r} is not a budget; write e.g. 30s, 2min, 200steps or 3epochs")
    value = float(match.group(1))
    if unit == "minutes":
        value, unit = value * 60, "seconds"
    if value <= 0 or (unit != "seconds" and not value.is_integer()):
        raise UsageError(f"{key}: {text!r} must be a positive amount (whole steps/epochs); e.g. 30s or 200steps")
    return Budget(value, unit)


@dataclass
class EvalSpec:
    every: Budget | None = None
    equal_steps: bool = False
    metrics: tuple[str, ...] = ("knn", "linprobe")
    img_size: int | None = None
    knn: dict[str, Any] = field(default_factory=dict)
    linprobe: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cell:
    """One pretraining run: its settings, seed and the labels of its grid position."""

    labels: dict[str, str]  # axis -> label, e.g. {'method': 'lomar'}
    settings: dict[str, Any]
    seed: int
    random_init: bool = False

    @property
    def setting_label(self) -> str:
        return "random init" if self.random_init else ", ".join(f"{k}={v}" for k, v in self.labels.items()) or "default"

    @property
    def name(self) -> str:
        base = "random" if self.random_init else "_".join(f"{k}-{v}" for k, v in self.labels.items()) or "cell"
        return re.sub(r"[^A-Za-z0-9_.=-]+", "-", base) + f"_seed{self.seed}"


@dataclass
class StudySpec:
    name: str
    budget: Budget
    seeds: list[int]
    slice_s: float
    settings: dict[str, Any]
    grid: dict[str, list[tuple[str, dict[str, Any]]]]  # axis -> [(label, settings)]
    eval: EvalSpec
    data_pretrain: str | None = None
    data_train: str | None = None
    data_val: str | None = None
    random_init: bool = False
    out: str | None = None
    notes: list[str] = field(default_factory=list)  # shown in results.md (e.g. a preset's scaling rule)

    def check_size(self) -> None:
        """Refuse a grid of more than MAX_CELLS cells, counted before any is built."""
        sizes = [len(values) for values in self.grid.values()]
        count = math.prod(sizes) * len(self.seeds) + self.random_init * len(self.seeds)
        if count > MAX_CELLS:
            shape = " x ".join(map(str, sizes + [len(self.seeds)]))
            raise UsageError(f"the grid has {count} cells ({shape} seed(s)); a study runs at most {MAX_CELLS}: "
                             f"shorten an axis or use fewer seeds")

    def check_every(self, budget_flag: str | None = None) -> None:
        """eval.every in the budget's unit (``budget_flag``: the budget came from that flag, not the spec)."""
        if self.eval.every is not None and self.eval.every.unit != self.budget.unit:
            given = f", from {budget_flag}" if budget_flag else ""
            raise UsageError(f"eval.every: {self.eval.every} must use the budget's unit ({self.budget.unit}{given}), "
                             f"e.g. every: 10s with budget: 30s")

    def check_folders(self) -> None:
        """Each cell its own run folder: a folder's name keeps only the letters, digits and _.=- of its labels,
        and where case is ignored (macOS's and Windows' default file systems) 'A' and 'a' are one folder."""
        folders: dict[str, tuple[str, str]] = {}
        for cell in self.cells():
            other, name = folders.setdefault(cell.name.lower(), (cell.setting_label, cell.name))
            if other != cell.setting_label:
                where = f"the cell folder {name}" if name == cell.name else \
                    f"one cell folder on a file system that ignores case (macOS, Windows): {name} and {cell.name}"
                raise UsageError(f"grid: '{other}' and '{cell.setting_label}' would share {where}; give them labels "
                                 f"that differ in {'letters or digits' if name == cell.name else 'more than case'}")

    def cells(self) -> list[Cell]:
        """Every (grid point, seed), seeds outermost; the random-init baseline first per seed."""
        axes, points = list(self.grid), list(itertools.product(*self.grid.values()))  # no axes: one point
        cells = []
        for seed in self.seeds:
            if self.random_init:
                cells.append(Cell({}, {**self.settings, "method": "lomar"}, seed, random_init=True))
            for point in points:
                settings = dict(self.settings)
                for _, values in point:
                    settings.update(values)
                cells.append(Cell({a: label for a, (label, _) in zip(axes, point)}, settings, seed))
        return cells


def _mapping(value: Any, key: str, valid: Any = None, settings: bool = False) -> dict[str, Any]:
    """A mapping of names (``-`` read as ``_``) drawn from ``valid`` (None: any); ``settings``: none
    of the study's own."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise UsageError(f"{key} must be a mapping of names to values, got {value!r}")
    value = {k.replace("-", "_"): v for k, v in value.items()}
    unknown = sorted(set(value) - set(valid)) if valid is not None else []
    if unknown:
        raise UsageError(f"{key}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    reserved = sorted(set(value) & _RESERVED) if settings else []
    if reserved:
        raise UsageError(f"{key}: {', '.join(reserved)} is set by the study for every cell; remove it")
    return value


def _axis(name: str, values: Any) -> list[tuple[str, dict[str, Any]]]:
    key = f"grid.{name}"
    if not isinstance(values, list) or not values:
        raise UsageError(f"{key} must be a non-empty list of values, e.g. {name}: [a, b]")
    out = []
    for value in values:
        if isinstance(value, dict):
            settings = _mapping(value, key, settings=True)
            label = str(settings.pop("label", ",".join(f"{k}={v}" for k, v in settings.items())))
            if not settings:
                raise UsageError(f"{key}: {value!r} sets nothing; give settings, e.g. {{window_size: 5, windows: 8}}")
        elif isinstance(value, (str, int, float, bool)):
            label, settings = str(value), _mapping({name: value}, key, settings=True)
        else:
            raise UsageError(f"{key}: {value!r} must be a value or a mapping of settings")
        out.append((label, settings))
    if len(dict(out)) != len(out):
        labels = [label for label, _ in out]
        raise UsageError(f"{key} has repeated values {labels}; give each a distinct value or label")
    return out


def seed_list(value: Any, key: str = "seeds") -> list[int]:
    """A count N (seeds 0 .. N-1) or a list of distinct seeds, at most MAX_SEEDS of them."""
    count = value if is_integer(value) else len(value) if isinstance(value, list) else 0
    if count > MAX_SEEDS:
        raise UsageError(f"{key}: {count} seeds is more than a study runs (at most {MAX_SEEDS}); pass fewer")
    if is_integer(value) and value > 0:
        return list(range(value))
    if isinstance(value, list) and value and all(is_integer(s) and s >= 0 for s in value) \
            and len(set(value)) == len(value):
        return list(value)
    raise UsageError(f"{key}: {value!r} must be a count (e.g. 3) or a list of distinct seeds (e.g. [0, 1, 2])")


def _flag(value: Any, key: str) -> bool:
    """true or false; bool() would read the string 'false' (or 'no', quoted) as true."""
    if not isinstance(value, bool):
        raise UsageError(f"{key}: {value!r} must be true or false")
    return value


def _eval(raw: Any) -> EvalSpec:
    raw = _mapping(raw, "eval", EvalSpec.__dataclass_fields__)
    every = None if raw.get("every") is None else parse_budget(raw["every"], "eval.every")
    if every is not None and every.unit == "epochs":
        raise UsageError("eval.every: use seconds or steps (e.g. 15s or 100steps), not epochs")
    metrics = raw.get("metrics", list(EvalSpec.metrics))
    metrics = [metrics] if isinstance(metrics, str) else metrics
    if not isinstance(metrics, list) or not set(metrics) <= set(METRICS):
        raise UsageError(f"eval.metrics: {metrics!r} must be a list drawn from {', '.join(METRICS)}")
    img_size = raw.get("img_size")
    if img_size is not None and (not is_integer(img_size) or img_size <= 0):
        raise UsageError(f"eval.img_size: {img_size!r} must be a positive whole number")
    return EvalSpec(every, _flag(raw.get("equal_steps", False), "eval.equal_steps"), tuple(metrics), img_size,
                    **{name: _mapping(raw.get(name), f"eval.{name}") for name in ("knn", "linprobe", "finetune")})


def parse_spec(raw: Any, source: str = "the spec", base: Path | None = None, notes: list[str] = ()) -> StudySpec:
    """A validated StudySpec from a mapping (relative paths resolve against ``base``; ``notes`` for results.md)."""
    if not isinstance(raw, dict):
        raise UsageError(f"{source} must hold a mapping with at least budget: and grid:")
    unknown = sorted(set(map(str, raw)) - _TOP_KEYS)
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(unknown)} in {source}; valid: {', '.join(sorted(_TOP_KEYS))}")
    if "budget" not in raw:
        raise UsageError(f"budget: missing in {source}; add e.g. budget: 60s (or 500steps, 3epochs)")
    paths = {}
    for key, value in _mapping(raw.get("data"), "data", ("pretrain", "train", "val")).items():
        given = Path(str(value)).expanduser()
        path = (base or Path()) / given  # an absolute path stays as it is
        if value is not None and not path.exists():
            # the spec's folder, not the working directory, is the base: say so, or the path seems to exist
            if path == given:
                raise UsageError(f"data.{key}: {value} does not exist; give an existing folder")
            raise UsageError(f"data.{key}: {value} (relative to the spec's folder: {path}) does not exist; "
                             f"give a path relative to {base}/ or an absolute one")
        paths[key] = None if value is None else str(path)
    if bool(paths.get("train")) != bool(paths.get("val")):
        raise UsageError("data.train and data.val go together (labelled ImageFolder splits); give both or neither")
    settings = _mapping(raw.get("settings"), "settings", settings=True)
    grid = {name: _axis(name, values) for name, values in _mapping(raw.get("grid"), "grid").items()}
    slice_b = parse_budget(raw.get("slice", "10s"), "slice")
    if slice_b.unit != "seconds":
        raise UsageError(f"slice: {raw.get('slice')!r} must be seconds, e.g. 10s")
    name = str(raw.get("name") or "study")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):  # it names the default folder studies/NAME
        raise UsageError(f"name: {name!r} must be letters, digits, '.', '_' or '-' (it names the folder "
                         f"studies/NAME); give out: for a folder elsewhere")
    spec = StudySpec(
        name=name, budget=parse_budget(raw["budget"], "budget"),
        seeds=seed_list(raw.get("seeds", 1)), slice_s=slice_b.value, settings=settings, grid=grid,
        eval=_eval(raw.get("eval")), data_pretrain=paths.get("pretrain"), data_train=paths.get("train"),
        data_val=paths.get("val"), random_init=_flag(raw.get("random_init", False), "random_init"),
        out=str((base or Path()) / Path(str(raw["out"])).expanduser()) if raw.get("out") else None, notes=list(notes))
    spec.check_size()
    spec.check_every()
    needs_labels = sorted(set(spec.eval.metrics) - {"heldout_loss"})
    if needs_labels and not (spec.data_train and spec.data_val):
        raise UsageError(f"eval.metrics {', '.join(needs_labels)} need labelled data: set data.train and data.val "
                         f"(ImageFolder class folders), or use eval.metrics: [] for pretraining only")
    if "heldout_loss" in spec.eval.metrics and not spec.data_val:
        raise UsageError("eval.metrics heldout_loss needs data.val (held-out images); set it or drop the metric")
    if spec.random_init and not spec.eval.metrics:
        raise UsageError("random_init: true has nothing to show without eval.metrics; drop it or add metrics")
    return spec


def load_spec(path: str | Path) -> StudySpec:
    path = Path(path)
    raw = read_settings(path, "study spec", "pass a YAML file or --preset NAME")  # a pipe too, as --config reads
    # a pipe's (<(sed ... spec.yaml)) relative paths are the working folder's, as a --config file's are
    return parse_spec(raw, str(path), base=path.parent if path.is_file() else None)
