"""What stops a run whose loss or weights went non-finite: the error that names the last good checkpoint and the fix
(:func:`diverged`, :func:`steadier`), the check of the weights before a save or an evaluation (:func:`check_weights`),
and the read of the checkpoint a run resumes from, which refuses one saved after its run diverged (:func:`preload`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from lomar.checkpoints.io import first_non_finite, safe_load
from lomar.errors import UsageError
from lomar.train.run_state import newest_state
from lomar.train.task import TrainingError

__all__ = ["steadier", "diverged", "check_weights", "preload", "non_finite_weight"]


def steadier(config, precision: str | None = None) -> str:
    """What to change after a non-finite loss, in the flags the command has, leaving out what the run already does
    (``precision``: the one it ran in, None if unknown): advice to use fp32 in an fp32 run changes nothing."""
    fields = getattr(config, "__dataclass_fields__", {})
    rates = "/".join(f"--{name}" for name in ("blr", "lr") if name in fields) or "the learning rate"
    clip = getattr(config, "clip_grad", None)
    fixes = [f"lower {rates}", *([f"lower --clip-grad (now {clip:g})" if clip else "set --clip-grad"]
                                 if "clip_grad" in fields else []),
             *(["use --precision fp32"] if precision != "fp32" else [])]
    return f"{', '.join(fixes[:-1])} or {fixes[-1]}" if len(fixes) > 1 else fixes[0]


def diverged(what: str, out: Path, config, precision: str | None, untrained: bool = False) -> TrainingError:
    """The error that stops a run whose loss or weights went non-finite: ``what``, the checkpoint kept, the fix;
    ``untrained``: the loss of the run's first step, before any update, which no lr or clipping can have caused."""
    last = newest_state(Path(out))
    kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
    if untrained:
        fp32 = "" if precision == "fp32" else ", or use --precision fp32"
        fields = getattr(config, "__dataclass_fields__", {})
        scale = " (--layer-scale-init, say)" if "layer_scale_init" in fields else ""
        return TrainingError(f"{what}, before any update (not the lr's doing); {kept}; check the settings that build "
                             f"the model{scale} and the data{fp32}")
    return TrainingError(f"{what}; {kept}; {steadier(config, precision)}")


def check_weights(model: torch.nn.Module, distributed: bool, step: int = 0, out: Path | None = None, config=None,
                  precision: str | None = None, resume: Path | None = None) -> None:
    """:func:`diverged` naming a weight of ``model`` that holds NaN or inf after the update of ``step`` (its loss was
    checked finite): before a save, which would overwrite the last good checkpoint, and before an evaluation, which
    would score it; ``resume``: UsageError, the model loaded from that checkpoint. A collective when ``distributed``."""
    if (bad := non_finite_weight(model, distributed)) is None:
        return
    if resume is not None:
        raise _diverged_checkpoint(resume, bad)
    raise diverged(f"weight {bad} holds NaN or inf after the update of step {step}, whose loss was finite; not saved",
                   out, config, precision)


def _diverged_checkpoint(path: Path, bad: str) -> UsageError:
    return UsageError(f"--resume {path}: its weight {bad} holds NaN or inf (saved after the run diverged); pass "
                      f"--resume {path.parent}/checkpoint-N.pt --overwrite (an earlier one), or another --out")


def preload(path: Path | None, device: torch.device) -> dict | None:
    """The checkpoint file a run resumes from (None: no resume, or a sharded folder, which every rank loads into its
    built shards), read before the run is built: weights that hold NaN or inf (a run that diverged, a damaged file)
    are refused before that cost is paid (a ViT-B's build, its data's listing: 2.5 s of a 2-core CPU at 32 px)."""
    if path is None or path.is_dir():
        return None
    ckpt = safe_load(path, map_location=device)
    model = ckpt.get("model")  # not a dict: the load names what does not fit
    if isinstance(model, dict) and (bad := first_non_finite(model)) is not None:
        raise _diverged_checkpoint(path, bad)
    return ckpt


def non_finite_weight(model: torch.nn.Module, distributed: bool = False) -> str | None:
    """The name of a parameter of ``model`` that holds NaN or inf, None when none does; ``distributed``: a
    collective, any process's (a sharded model's shard: its local part) counts. One host read."""
    named = [(name, p.to_local() if hasattr(p, "to_local") else p) for name, p in model.named_parameters()]
    finite = torch.stack([torch.isfinite(value).all() for _, value in named]).float()
    bad = (finite.numel() - finite.sum()).reshape(1)
    if distributed:
        dist.all_reduce(bad)
    *flags, count = torch.cat([finite, bad]).tolist()
    if not count:
        return None
    return next((name for (name, _), ok in zip(named, flags) if not ok), "a weight of another process's shard")
