"""The pretraining run folder: which checkpoint a run resumes from, and what a fresh, resumed or
overwritten run clears or writes before its first step (the caller holds the folder's lock)."""

from __future__ import annotations

import shutil
from pathlib import Path

from lomar.checkpoints.io import atomic_write_text
from lomar.train.config import PretrainConfig, dump_config
from lomar.train.run_state import (
    find_resume_checkpoint,
    remove_newer_checkpoints,
    remove_stale_temporaries,
    truncate_metrics,
)
from lomar.train.settings_resume import refuse_held_run

__all__ = ["resume_path", "prepare_folder"]


def resume_path(config: PretrainConfig, out: Path, is_main: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run. ``--resume auto`` falls back to the
    newest intact ``checkpoint-*.pt`` when ``last.pt`` is gone or unreadable, and says so."""
    if config.resume == "auto":
        path, notes = find_resume_checkpoint(out)
        for note in notes if is_main else ():
            print(f"lomar: {note}", flush=True)
        return path
    return Path(config.resume) if config.resume else None


def prepare_folder(config: PretrainConfig, out: Path, resume: Path | None, step: int) -> None:
    """Main process, lock held: a fresh run clears what an overwritten run left; a resume cuts
    the log back to its checkpoint; the config is written."""
    removed = remove_stale_temporaries(out)
    if removed:
        print(f"lomar: removed {len(removed)} stale temporary file(s) in {out}, e.g. {removed[0].name}")
    if resume is not None:
        if config.overwrite:
            remove_newer_checkpoints(out, step)
        truncate_metrics(out / "metrics.jsonl", step)
        print(f"lomar: resumed from {resume} at step {step}")
    else:
        refuse_held_run(out, config.resume, config.overwrite)  # another run may have got here since validation
        if config.overwrite:  # everything a run writes, so that nothing of the old one lingers
            for stale in ("last.pt", "metrics.jsonl", "config.yaml", "knn.jsonl", "encoder.safetensors",
                          "config.json", "reconstruction.png", "loss.png"):
                (out / stale).unlink(missing_ok=True)
            for stale in [*out.glob("checkpoint-*.pt"), *out.glob("reconstruction-*.png")]:
                stale.unlink()
            for stale in out.glob("checkpoint-*.dcp"):
                shutil.rmtree(stale)
            (out / "last.json").unlink(missing_ok=True)
            shutil.rmtree(out / "tb", ignore_errors=True)
    atomic_write_text(out / "config.yaml", dump_config(config))
