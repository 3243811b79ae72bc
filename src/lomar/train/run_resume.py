"""What a resume reads of its run folder and checkpoint, read once and handed on: the :class:`ResumePoint`.

``--resume auto`` looks through the run folder (:mod:`lomar.train.run_state` keeps it) for its newest intact state;
``--resume PATH`` names one. Either is read without its weights (:func:`~lomar.train.run_state.read_meta`) when the
settings are resolved (the run's saved settings come from it), and what was read goes with the settings to the run
(:func:`lomar.train.lifecycle.run`): its refusals and its "nothing to do" at the run's end read nothing again, and
only the weights are read (:func:`lomar.train.divergence.preload`). Under the run's lock ``auto`` searches the folder
again: a run that saved meanwhile may have left a newer state, which the folder's time need not show (a clock of 1-2 s
on some filesystems, attributes an NFS client cached); a checkpoint whose file changed since is read again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from lomar.checkpoints.file_names import LAST_POINTER
from lomar.data.shard_members import file_identity
from lomar.errors import UsageError
from lomar.train.precision import trained_precision_kept
from lomar.train.run_state import (
    checkpoint_number,
    checkpoint_step,
    foreign,
    holds_run,
    newest_state,
    read_meta,
    read_state,
    same_file,
    training_step,
)
from lomar.train.setting_names import as_given
from lomar.values import brief

__all__ = ["ResumePoint", "read_resume_point", "find_resume_point", "auto_resume",
           "resume_point", "check_no_rewind", "listing_record", "listing_change", "numerics_notes"]


@dataclasses.dataclass
class ResumePoint:
    """One read of what ``--resume`` starts from, handed on instead of read again: ``path`` (None: nothing to
    resume), ``meta`` (its :func:`read_meta` without the weights, which :func:`lomar.train.divergence.preload` reads;
    None when it does not read), ``notes`` (what ``--resume auto`` skipped). It answers ``resume`` (the --resume given)
    in ``out`` (the folder searched, for ``auto``) while its file is as it was then (``stamp``: its
    :func:`~lomar.data.shard_members.file_identity` before the read)."""

    resume: str
    path: Path | None
    meta: dict | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    out: Path | None = None
    stamp: tuple | None = None

    @property
    def step(self) -> int | None:
        """The step of its training state; None when there is none."""
        return None if self.path is None or self.meta is None else training_step(self.path, self.meta)

    def answers(self, resume: str, out: Path) -> bool:
        """Whether this read still answers ``--resume resume --out out``: its file is unchanged (a save replaces it by
        a rename). For ``auto``, of that file only: a newer state the folder gained is :func:`find_resume_point`'s."""
        if self.resume != resume or (resume == "auto" and Path(out).resolve() != self.out):
            return False
        return self.path is not None and self.stamp == file_identity(self.path)


def _light(ckpt: dict | None) -> dict | None:
    """``ckpt`` with its weights' entries None (only the full read, :func:`lomar.train.divergence.preload`, loads them)
    and the rest copied: a mapped file's tensors (its RNG states) keep the whole file mapped, and the run holds
    this to its end."""
    if ckpt is None:
        return None
    return copy.deepcopy({k: None if k in ("model", "optimizer") else v for k, v in ckpt.items()})


def read_resume_point(path: Path, resume: str | None = None, strict: bool = True) -> ResumePoint:
    """The :class:`ResumePoint` of the checkpoint ``path`` (``resume``: the --resume that named it, default the
    path); ``strict``: OSError or ValueError when it cannot be read, else its ``meta`` is None."""
    point = ResumePoint(resume or str(path), path, stamp=file_identity(path))
    try:
        point.meta = _light(read_meta(path))
    except (OSError, ValueError):
        if strict:
            raise
    return point


def find_resume_point(out: Path, known: ResumePoint | None = None) -> ResumePoint:
    """``--resume auto``'s :class:`ResumePoint` in ``out``: ``last.pt`` (or the folder ``last.json`` names), unless
    a ``checkpoint-*.pt`` / ``checkpoint-*.dcp`` that reads is at a later step (a run killed between the two
    writes) or it does not read; the notes name what was skipped. ``known``: a checkpoint read already, not read
    again."""
    out, stamps = Path(out), {}

    def state_of(path: Path) -> dict | None:
        if known is not None and known.meta is not None and same_file(path, known.path):
            stamps[path] = known.stamp
            return known.meta
        stamps[path] = file_identity(path)  # before the read: a save meanwhile makes it stale
        return read_state(path)

    notes = []
    last = newest_state(out)
    sharded = (out / LAST_POINTER).exists()
    last_meta = state_of(last) if sharded or last.exists() else None
    last_step = None if last_meta is None else training_step(last, last_meta)

    def point(path: Path | None, meta: dict | None) -> ResumePoint:
        return ResumePoint("auto", path, _light(meta), notes, out.resolve(), stamps.get(path))

    if (sharded or last.exists()) and last_step is None:
        notes.append(f"{out / LAST_POINTER} names no intact checkpoint, skipped" if sharded
                     else f"{last} cannot be read, skipped")
    candidates = sorted((p for p in out.glob("checkpoint-*") if checkpoint_number(p.name) is not None),
                        key=lambda p: -checkpoint_number(p.name))
    for path in (p for p in candidates if last_step is None or checkpoint_number(p.name) > last_step):
        meta = state_of(path)
        if (step := None if meta is None else training_step(path, meta)) is not None and \
                (last_step is None or step > last_step):
            if last_step is not None:
                notes.append(f"{last} is at step {last_step}, behind {path.name}")
            elif not (sharded or last.exists()):
                notes.append(f"{last} is missing")
            notes.append(f"resuming from the newest intact checkpoint, {path}")
            return point(path, meta)
        notes.append(f"{path} cannot be read, skipped")
    return point(last, last_meta) if last_step is not None else point(None, None)


def auto_resume(out: Path, overwrite: bool, found: ResumePoint | None = None) -> ResumePoint:
    """``--resume auto``: :func:`find_resume_point` (``found``: what it found already), refusing (unless
    ``overwrite``) to start over on top of checkpoints none of which reads: the new run would delete them. Its
    ``path`` None: nothing to resume, a new run starts (:func:`lomar.train.lifecycle.run` says so)."""
    found = found or find_resume_point(out)
    if found.path is None and found.notes and not overwrite:
        raise UsageError(f"--resume auto: no checkpoint in {out} can be read ({'; '.join(found.notes)}); restore one, "
                         f"or pass --overwrite to start a new run there")
    return found


def resume_point(resume: str | None, out: Path, overwrite: bool, read: ResumePoint | None = None) -> ResumePoint | None:
    """What ``--resume`` (``resume``) starts from in ``out``, told under the run's lock: ``read`` (as the settings'
    resolution read it) while it still answers them, else read now (a checkpoint that does not read is left to the
    full read to report); ``auto``: :func:`auto_resume` of the folder searched again, ``read`` taken for its
    checkpoint. None when not resuming."""
    if not resume:
        return None
    known = read if read is not None and read.answers(resume, out) else None
    if resume == "auto":
        return auto_resume(out, overwrite, find_resume_point(out, known))
    return known or read_resume_point(Path(resume), strict=False)


def check_no_rewind(resume: Path, out: Path, overwrite: bool, point: ResumePoint | None = None,
                    in_file: dict[str, str] | None = None) -> None:
    """Refuse, unless ``overwrite``, to resume an older state into a folder whose newest state is newer (it would
    be rewound), or another folder's checkpoint into a folder that holds a run (their files would mix). ``point``:
    what was read of ``resume`` (``--resume auto``'s: the newest state of ``out`` itself); ``in_file``: the settings
    file by setting, whose resume: and out: are named as its lines."""
    given = {name: as_given(name, str(value), (in_file or {}).get(name)) for name, value in (("resume", resume),
                                                                                             ("out", out))}
    if overwrite or (point is not None and point.resume == "auto" and point.out == Path(out).resolve()):
        return
    newest = find_resume_point(out, point)  # the newest intact state, if last.pt is missing, cut or behind
    last, rewinds = newest.path, None
    if last is not None and not (resume.exists() and last.samefile(resume)):
        newer = newest.step
        older = point.step if point is not None and point.path == resume else checkpoint_step(resume)
        if newer is not None and older is not None and newer > older:
            rewinds = older
            if not foreign(resume, out):
                raise UsageError(f"{given['resume']} (step {older}) would rewind {out}, whose {last.name} is at step "
                                 f"{newer}; pass --out NEW_FOLDER to branch off, --overwrite to rewind, or resume "
                                 f"{last}")
    if foreign(resume, out) and holds_run(out):
        # --overwrite clears the run (its log too), as for any other folder's checkpoint: a rewind, which keeps the
        # log up to the checkpoint's step, resumes a checkpoint in the run's own folder
        rewind = (f"; a copy of this run's checkpoint rewinds it, its log kept up to step {rewinds}, from inside "
                  f"{out}: put it there and resume it with --overwrite") if rewinds is not None else ""
        raise UsageError(f"{given['resume']} is another folder's checkpoint, and {given['out']} already holds a run; "
                         f"pass --out NEW_FOLDER to branch off, or --overwrite to replace that run{rewind}")


def listing_record(names: Iterable[str], root: str, count: int) -> dict:
    """What a checkpoint keeps of the data listing its sample indices point into: ``count`` (the samples of an epoch)
    and a digest of ``names`` (the listing's entries, in its order) each relative to ``root`` (one outside it whole),
    so that the same files in a moved folder give the same record."""
    prefix = os.path.join(root, "")
    digest = hashlib.sha256(os.fsencode("\0".join(name.removeprefix(prefix) for name in names)))
    return {"count": count, "digest": digest.hexdigest()[:16]}


def listing_change(saved: dict | None, now: dict | None, data: str | None, ckpt: dict) -> str | None:
    """The warning for a resume whose ``data`` (None: the demo photographs) lists other files than the checkpoint
    ``ckpt`` recorded (``saved``: its :func:`listing_record`; None, from a checkpoint that has none: nothing to
    compare); None when the same."""
    if not isinstance(saved, dict) or now is None or saved == now:
        return None
    was, count = saved.get("count"), now["count"]
    what = f"{count} images as then, but not the same files" if was == count else \
        f"{count} images now, {brief(was)} then"
    epoch = ckpt.get("epoch")
    rest = (f"samples are drawn by their place in the listing, so the rest of epoch {epoch} reads other images than "
            f"the stopped run would have" if ckpt.get("batches_done") else
            f"from epoch {epoch} on the run trains on the listing as it is now")
    source = f"--data {data}" if data else "the data (the demo photographs: no --data)"
    return (f"{source} has changed since this checkpoint was saved ({what}): {rest}; the resume does not continue "
            f"exactly where it stopped")


def numerics_notes(ckpt: dict, precision: str, setting: str, device) -> list[str]:
    """What a resume from ``ckpt`` is told of its arithmetic, one line each: a precision (``precision``, from
    --precision ``setting``) other than the one the checkpoint records having trained in; the run's kept where this
    machine's 'auto' would pick another, or none recorded, under 'auto' (:func:`trained_precision_kept`); a device (a
    torch.device) of another kind than the run's, which its RNG state tells: it holds a CUDA stream where it trained
    on CUDA (since every rank's states were kept, ``rng_ranks``; an older checkpoint's tells no device)."""
    step, ran, notes = ckpt.get("step"), ckpt.get("precision"), []
    if setting == "auto":
        notes += [note] if (note := trained_precision_kept(setting, ran, "the run", device)[1]) else []
    elif ran is not None and ran != precision:
        fresh = "; fp16's loss scale starts afresh, as a new fp16 run's" if precision == "fp16" else ""
        notes.append(f"precision {ran} → {precision} after step {step}, as --precision {setting} asks{fresh}")
    rng = ckpt.get("rng") if "rng_ranks" in ckpt else None  # a CUDA run's older checkpoint held no CUDA stream
    if isinstance(rng, dict) and (was := "cuda" if "cuda" in rng else "cpu") != device.type:
        notes.append(f"device {was} → {device.type} after step {step}: the weights and optimizer state move over; "
                     f"its kernels and device random draws (drop path) differ, so it does not go on bit for bit")
    return notes
