"""What a resumed run may change (each setting's declared resume policy), which checkpoint
``--resume`` names, and the one check that a new run does not take over a folder holding one."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lomar.train.settings import ConfigError, coerce_all, declarations, explicit_values, shown

__all__ = ["resume_values", "lay_schedule_over_max_steps", "resume_target", "refuse_held_run", "task_values"]


def task_values(cls: type, args, command: str,
                saved_settings: Callable[[dict], dict | None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values, explicit) of a training command's run: the YAML file's and the flags' settings over
    the resumed checkpoint's (``saved_settings(checkpoint)`` gives them; None: not this command's
    checkpoint) or over the declared defaults with the schedule laid over ``--max-steps``; ``out``
    defaults to runs/<timestamp>, and a checkpoint resumes into its own folder unless told otherwise."""
    explicit = explicit_values(cls, args)
    path = resume_target(explicit)
    if path is None:
        values = {**dataclasses.asdict(cls()), **explicit}
        lay_schedule_over_max_steps(values, explicit)
    else:
        from lomar.checkpoints.io import safe_load  # torch: not for --help

        try:
            checkpoint = safe_load(path, mmap=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--resume: {exc}") from None
        settings = saved_settings(checkpoint)
        if not isinstance(settings, dict):
            raise ConfigError(f"--resume {path} is not a `lomar {command}` checkpoint; to start from pretrained "
                              f"weights pass them as --pretrained")
        saved = coerce_all(cls, settings, str(path), strict=False)
        if "out" not in explicit:
            saved["out"] = str(path.parent)
        values = resume_values(cls, saved, str(path), explicit)
    if values.get("out") is None:
        values["out"] = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    return values, explicit


def resume_values(cls: type, saved: dict[str, Any], source: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """The saved run's settings, with the explicit run-control ones on top; any other explicit
    setting must equal the saved one (a different model or batch cannot continue the run)."""
    policy = {name: s.resume for name, s in declarations(cls).items()}
    fresh = {name: getattr(cls(), name) for name, p in policy.items() if p == "per-invocation"}
    values = {**dataclasses.asdict(cls()), **saved, **fresh}
    for name, value in explicit.items():
        if policy[name] in ("run-control", "per-invocation") or value == values[name] or \
                (value is None and policy[name] == "derived"):
            continue
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} {shown(value)} differs from {shown(values[name])} in the run being resumed "
                          f"({source}); drop {flag} to continue the run, or start a new run with another --out")
    values.update({k: v for k, v in explicit.items() if policy[k] in ("run-control", "per-invocation")})
    if "epochs" in explicit and "max_steps" not in explicit and "max_steps" in values:
        values["max_steps"] = None  # a new --epochs is where the run now ends, not the old --max-steps
    return values


def lay_schedule_over_max_steps(values: dict[str, Any], explicit: dict[str, Any]) -> None:
    """A new run given ``--max-steps`` and no ``--epochs``: its lr schedule spans the steps that will
    run (``schedule_steps``), so a short run warms up and anneals instead of stopping inside the
    recipe's warm-up. A resumed run keeps the schedule it started with."""
    if values.get("max_steps") and "epochs" not in explicit and "schedule_steps" not in explicit:
        values["schedule_steps"] = values["max_steps"]


def resume_target(explicit: dict[str, Any], sharded_ok: bool = False) -> Path | None:
    """The checkpoint ``--resume`` names: None when not resuming, or when ``--resume auto`` finds
    no intact checkpoint in ``--out``. ``sharded_ok``: a sharded (``.dcp``) folder may be named."""
    resume = explicit.get("resume")
    if not resume:
        return None
    if resume == "auto":
        if explicit.get("out") is None:
            raise ConfigError("--resume auto needs --out RUN_FOLDER (the run to continue); or pass "
                              "--resume RUN_FOLDER/last.pt")
        from lomar.train.run_state import find_resume_checkpoint  # torch: not for --help

        out = Path(explicit["out"])
        return find_resume_checkpoint(out)[0] if out.is_dir() else None
    path = Path(resume)
    if sharded_ok and path.is_dir() and (path / ".metadata").is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"--resume {path} is a folder; pass {path / 'last.pt'}, or --out {path} --resume auto")
    if not path.is_file():
        raise ConfigError(f"--resume {path} does not exist; pass a checkpoint file or 'auto'")
    return path


def refuse_held_run(out: Path, resume: str | None, overwrite: bool) -> None:
    """The one check of every command that writes a run folder: a new run does not take over a
    folder that holds one (a checkpoint, or the settings of a run stopped before its first)."""
    held = (Path(out) / "last.pt").exists() or (Path(out) / "config.yaml").exists()
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 may already have started
    if held and is_main and not resume and not overwrite:
        raise ConfigError(f"--out {out} already holds a run; pass --resume auto to continue it, "
                          f"--overwrite to replace it, or another --out")
