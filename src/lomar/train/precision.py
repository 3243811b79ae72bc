"""A run's numeric precision: ``auto`` resolved for the device, and the autocast context of each."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lomar.train.divergence import diverged
from lomar.train.settings import PRECISIONS

__all__ = ["resolve_precision", "run_precision", "auto_precision", "trained_precision_kept", "cpu_has_bf16",
           "emulated_bf16_notes", "autocast_factory", "WatchedScaler", "OVERFLOWS_IN_A_ROW"]

# fp16 steps skipped in a row that stop a run: its loss scale fell 2**30-fold, and no model trains at such a scale
OVERFLOWS_IN_A_ROW = 30


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where the hardware multiplies bf16 natively (a CUDA device of compute capability 8 or more, a
    CPU with AVX-512 BF16 or AMX), else fp32, also on a GPU that only emulates bf16 (T4, V100: fp16 is fast there)."""
    if precision == "auto":
        native = torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda" else \
            device.type == "cpu" and cpu_has_bf16()
        return "bf16" if native else "fp32"
    return precision


def run_precision(config, device: torch.device) -> str:
    """The precision a run trains in: ``config.precision`` resolved for ``device``, 'auto' as :func:`auto_precision`
    resolves it."""
    return auto_precision(config, device) if config.precision == "auto" else resolve_precision(config.precision, device)


def auto_precision(config, device: torch.device) -> str:
    """What --precision auto trains the run of ``config`` in on ``device``: a resumed run keeps the precision its
    checkpoint (``config.resume_point``) records having trained in, as :func:`trained_precision_kept` keeps it."""
    point = getattr(config, "resume_point", None)
    return trained_precision_kept("auto", (getattr(point, "meta", None) or {}).get("precision"), "the run", device)[0]


def trained_precision_kept(setting: str, recorded: str | None, trained: str, device: torch.device
                           ) -> tuple[str, str | None]:
    """The precision that --precision ``setting`` gives a model trained before (``trained``, as the note names it:
    'the run' a resume continues, 'the classifier' an evaluation or a prediction runs, 'the probe' of a `linprobe
    --save` file), on ``device``, and the note to print (None: nothing to say). 'auto' keeps ``recorded``, the
    precision its checkpoint records having trained in, so that a machine whose own 'auto' differs (an AMX CPU's bf16,
    another CPU's fp32; a CPU smoke test's fp32 on a GPU) does not change its numerics unasked, and says so where this
    machine's 'auto' would pick another; a checkpoint that records none (an older lomar's, one converted from the
    original code, an original classifier) gets this machine's 'auto', and the note says that it records none.
    Another setting is taken as given."""
    if setting != "auto":
        return resolve_precision(setting, device), None
    own = resolve_precision("auto", device)
    if recorded not in PRECISIONS:
        return own, (f"precision {own}, --precision auto's choice on this machine: the checkpoint does not record the "
                     f"precision {trained} trained in")
    if recorded == own:
        return recorded, None
    return recorded, (f"precision {recorded}, the one {trained} trained in (this machine's --precision auto would pick "
                      f"{own}); pass --precision {own} to switch")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions. With them oneDNN runs bf16 autocast's products
    at 2-4x its fp32 rate; without them bf16 is emulated and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def emulated_bf16_notes(setting: str, device: torch.device, auto: str = "fp32") -> list[str]:
    """The start's note where ``--precision bf16`` (``setting``) is asked of a CPU that only emulates bf16 (no
    :func:`cpu_has_bf16`): its products run several times slower than fp32's (a linear layer's ~10x, forward and
    backward, on a 2-core CPU without AVX-512 BF16). ``auto``: what --precision auto would pick instead (fp32 on such
    a CPU; a run's recorded precision where auto keeps it), named as the way out unless it is bf16 too."""
    if setting == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        way_out = f"; --precision auto picks {auto} here" if auto != "bf16" else ""
        return ["bf16 on this CPU is emulated (no AVX-512 BF16/AMX): expect it several times slower than fp32"
                + way_out]
    return []


def autocast_factory(precision: str, device: torch.device):
    """A zero-argument callable giving the autocast context of a resolved precision."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


class WatchedScaler(torch.amp.GradScaler):
    """fp16's GradScaler (disabled, a pass-through), whose skipped steps are counted. It skips the update of a step
    whose scaled gradients overflowed and halves its scale; a run whose every step overflows keeps a finite loss and
    unchanged weights, so nothing else would show that it learns nothing: :func:`diverged` stops a run (folder
    ``out``, settings ``config``) after ``OVERFLOWS_IN_A_ROW`` skipped steps in a row."""

    def __init__(self, device_type: str, precision: str, out: Path, config):
        super().__init__(device_type, enabled=precision == "fp16")
        self.out, self.config, self.last_scale, self.overflowed = out, config, None, 0

    def watch(self, step: int) -> dict[str, float]:
        """The scale of step ``step``'s loss, for its record ({} outside fp16). Read after the step's host sync, it
        waits for nothing; a drop since the previous step's reading is that step skipped."""
        if not self.is_enabled():
            return {}
        scale = self.get_scale()
        if self.last_scale is not None:
            self.overflowed = self.overflowed + 1 if scale < self.last_scale else 0
        self.last_scale = scale
        if self.overflowed >= OVERFLOWS_IN_A_ROW:
            raise diverged(f"fp16: the gradients of the {self.overflowed} steps before step {step} all overflowed, "
                           f"so none was applied (the loss scale fell to {scale:g})", self.out, self.config, "fp16")
        return {"loss_scale": scale}
