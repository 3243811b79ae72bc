"""What a resumed run may change (each setting's declared resume policy: :func:`resume_values`), which checkpoint
``--resume`` names (:func:`resume_target`), and the refusal of a resume past the run's end. The settings they resolve:
:class:`lomar.train.task_config.TaskConfig`. Imports no torch."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lomar.checkpoints.file_names import ENCODER_WEIGHTS, LAST
from lomar.train.process_count import process_change
from lomar.train.setting_names import as_given
from lomar.train.settings import ConfigError, declarations, shown
from lomar.values import command_line

if TYPE_CHECKING:  # torch: not at import
    from lomar.train.run_resume import ResumePoint

__all__ = ["resume_values", "resume_target", "resumed_past_end", "ResumeMismatch"]


class ResumeMismatch(ConfigError):
    """A setting given to a resume that differs from the run's: ``name``, both values as shown, ``source`` (the
    checkpoint), for a caller that passed the setting itself (a study's cell) to say so its own way."""

    def __init__(self, message: str, name: str, given: str, had: str, source: str):
        super().__init__(message)
        self.name, self.given, self.had, self.source = name, given, had, source


def resume_values(cls: type, saved: dict[str, Any], source: str, explicit: dict[str, Any],
                  in_file: dict[str, str] | None = None, processes: int | None = None,
                  held: dict[str, str] | None = None) -> dict[str, Any]:
    """The saved run's settings, with the explicit run-control ones on top; any other explicit
    setting must equal the saved one (a different model or batch cannot continue the run). ``in_file``: the
    YAML file of each setting given there, not by a flag (the error names the file's line to remove).
    ``processes``: how many trained the run (:func:`processes_of`; None: unknown); on another number, given by
    WORLD_SIZE, --batch-size and --accum-steps must keep the global batch (:func:`process_change`), and may
    change to keep it. ``held``: run-control settings this resume cannot change, each with why (its refusal's
    words after the checkpoint)."""
    held = held or {}
    policy = {name: "held" if name in held else s.resume for name, s in declarations(cls).items()}
    fresh = {name: getattr(cls(), name) for name, p in policy.items() if p == "per-invocation"}
    values = {**dataclasses.asdict(cls()), **saved, **fresh}
    now = int(os.environ.get("WORLD_SIZE", "1") or 1)
    batch = {k: explicit.get(k, values.get(k)) for k in ("batch_size", "accum_steps")}
    change = None if processes is None else process_change(values, processes, batch, now)
    for name, value in explicit.items():
        if policy[name] in ("run-control", "per-invocation") or value == values[name] or \
                (value in (None, "auto") and policy[name] == "derived") or \
                (name in batch and processes is not None and change is None):  # the global batch kept
            continue
        if name in batch and processes is not None and processes != now:
            raise ConfigError(change)
        had = "the default (unset)" if values[name] is None else shown(values[name])  # not "None"
        given = as_given(name, shown(value), file := (in_file or {}).get(name))
        fix = f"remove it from {file}" if file else f"drop --{name.replace('_', '-')}"
        raise ResumeMismatch(f"{given} differs from {had} in the run being resumed ({source}){held.get(name, '')}; "
                             f"{fix} to continue the run, or start a new run with another --out",
                             name, shown(value), had, source)
    if change is not None and processes != now:
        raise ConfigError(change)
    values.update({k: v for k, v in explicit.items() if policy[k] in ("run-control", "per-invocation")
                   or k in batch and processes is not None})
    # a new --epochs is where the run now ends, not the old --max-steps; the same epochs of the --config file the
    # run started with, given again with --resume, are not (the run went on to the epochs' end)
    new_end = "epochs" in explicit and ("epochs" not in (in_file or {}) or explicit["epochs"] != saved.get("epochs"))
    if new_end and "max_steps" not in explicit and "max_steps" in values:
        values["max_steps"] = None
    return values


def resume_target(explicit: dict[str, Any], sharded_ok: bool = False) -> ResumePoint | None:
    """The checkpoint ``--resume`` names, read without its weights (a :class:`~lomar.train.run_resume.ResumePoint`):
    None when not resuming, or when ``--resume auto`` finds none in ``--out``. ``sharded_ok``: a ``.dcp`` folder too."""
    resume = explicit.get("resume")
    if not resume:
        return None
    if explicit.get("eval_only"):  # before the run's settings would be checked against this invocation's
        raise ConfigError(f"--eval-only scores --pretrained and continues no run; drop --resume {resume}")
    from lomar.train.run_resume import find_resume_point, read_resume_point  # torch: not for --help

    if resume == "auto":
        if explicit.get("out") is None:
            raise ConfigError("--resume auto needs --out RUN_FOLDER (the run to continue); or pass "
                              "--resume RUN_FOLDER/last.pt")
        out = Path(explicit["out"])
        point = find_resume_point(out) if out.is_dir() else None
        return point if point is not None and point.path is not None else None
    path = Path(resume)
    if path.is_dir() and not (sharded_ok and (path / ".metadata").is_file()):
        raise ConfigError(_folder_to_resume(path))
    if not path.is_dir() and not path.is_file():
        what = "is not a regular file (a device or pipe)" if path.exists() else "does not exist"
        raise ConfigError(f"--resume {path} {what}; pass a checkpoint file or 'auto'")
    try:
        return read_resume_point(path, resume)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume {path}: {exc}; pass an intact checkpoint-NNNNNN.dcp folder" if path.is_dir()
                          else f"--resume: {exc}") from None


def _folder_to_resume(path: Path) -> str:
    """The refusal of ``--resume FOLDER``, pointing at what that folder holds: its last.pt, its checkpoints, or
    nothing to resume (an export, whose encoder keeps no optimizer state, or another folder)."""
    auto = command_line("--out", path, "--resume", "auto")  # to copy: a path with a space stays one argument
    if (path / LAST).is_file():
        return f"--resume {path} is a folder; pass {command_line(path / LAST)}, or {auto}"
    if next(path.glob("checkpoint-*"), None) is not None:
        return f"--resume {path} is a folder; pass one of its checkpoint-N files, or {auto}"
    held = ("an exported encoder's folder: weights without a run's training state" if (path / ENCODER_WEIGHTS).is_file()
            else f"a folder holding no run's checkpoint ({LAST} or checkpoint-N)")
    return f"--resume {path} is {held}; pass a training run's checkpoint file, or --out RUN --resume auto"


def resumed_past_end(step: int, last_step: int, config, steps_per_epoch: int) -> str:
    """The refusal of a resume whose settings end the run before the step its checkpoint holds: it would do
    nothing, and a missing end-of-run export would be written from the later weights as if they were step
    ``last_step``'s."""
    epochs = math.ceil(step / steps_per_epoch)
    by, fix = ((f"--max-steps {config.max_steps}", f"--max-steps {step}") if config.max_steps == last_step else
               (f"--epochs {config.epochs} of {steps_per_epoch} steps", f"--epochs {epochs}"))
    return (f"--resume: the run is at step {step}, past step {last_step} where {by} ends it, and a resume does not "
            f"go back; pass {fix} or more, or resume an earlier checkpoint: --resume {config.out}/checkpoint-N.pt "
            f"--overwrite")
