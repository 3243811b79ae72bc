"""Run monitoring: metrics.jsonl, TensorBoard scalars, printed lines and progress bars on stderr."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from lomar.checkpoints.file_names import METRICS
from lomar.checkpoints.io import open_in_place, read_log, refuse_link
from lomar.progress_bar import progress
from lomar.values import command_line, percent_text

__all__ = ["Monitor", "input_limit_note", "read_records", "metric_text", "metric_value", "images_per_second",
           "INPUT_BOUND"]

_LABELS = {"top1": "top-1", "top5": "top-5", "knn_top1": "k-NN top-1"}  # accuracies, printed in percent
# Scores their tasks log in percent already (detect's COCO AP, segment's mIoU, mAcc, aAcc), printed as the accuracies
# are, so that no score's line leaves its unit to be guessed (box_AP 0.04869 read as a fraction is 4.9 %)
_IN_PERCENT = ("box_AP", "mask_AP", "mIoU", "mAcc", "aAcc")
INPUT_BOUND = 0.2  # a run whose loop waits this share of a step's time for batches is limited by its input
_FASTER = {"full": " or --decode draft (or gpu on CUDA)", "draft": " or --decode gpu on CUDA",
           "windows": " or --decode gpu on CUDA",
           "gpu": "; at camera resolution the device's JPEG decoding itself can be the limit, and more workers "
                  "take a larger share of it (--cpu-decode-share auto; benchmarks/README.md)"}


def metric_value(key: str, value: float | None) -> str:
    """A score as the log prints it: an accuracy (a fraction) in percent ("27.78%"), a score logged in percent with
    its unit ("box_AP 4.87%", "mIoU 45.10%"), n/a where undefined (None, NaN), another as it is."""
    if value is None or math.isnan(value):
        return "n/a"
    if key in _LABELS:
        return f"{percent_text(100 * value)}%"
    return f"{percent_text(value)}%" if key.startswith(_IN_PERCENT) else f"{value:.4g}"


def metric_text(key: str, value: float) -> str:
    """A score under its label, as the log prints it ("top-1 27.78%")."""
    return f"{_LABELS.get(key, key)} {metric_value(key, value)}"


def images_per_second(rate: float) -> str:
    """A step's img/s as the log prints it: one decimal, or two significant digits below 1 img/s, where one
    decimal would print a slow CPU step's 0.04 as 0.0."""
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"


class Monitor:
    """metrics.jsonl + TensorBoard + a progress bar; plain lines every ``log_every`` steps on stdout when
    stdout is not a terminal."""

    def __init__(self, out: Path, active: bool, total: int, log_every: int, name: str = "train", start: int = 0):
        self.active, self.every, self.total, self.out = active, log_every, total, out
        self.bar = self.writer = self.file = None
        self.input_waits: list[float] = []  # this run's steps, for input_limit_note
        if not active:
            return
        refuse_link(out / "tb")  # TensorBoard would write its event files wherever the link points
        self.file = open_in_place(out / METRICS, "a")
        try:  # a writer that fails to start (tb not a folder, a full disk) leaves no file open
            self.writer = _start_board(out, start)
            if self.writer is not None:
                # A run stopped by an error (a non-finite loss, a full disk) closes no Monitor, and at exit
                # TensorBoard's writer thread dropped what it had not written yet: the last steps before the error.
                weakref.finalize(self, _close_quietly, self.writer)
            self.bar = progress(total=total, desc=name, initial=start, unit="step")
        except BaseException:
            self.abandon()
            raise
        self.lines = not sys.stdout.isatty()

    def step(self, step: int, epoch: int, loss: float, lr: float, ips: float, parts: dict | None = None,
             input_wait: float = 0.0) -> None:
        """One optimizer step: its mean loss; ``parts``: its mean loss parts and step metrics by name (a
        task's ``loss_parts``, ``step_metrics``) and the task's ``step_info()``; ``input_wait``: the share of
        the step's time the loop waited for batches."""
        if not self.active:
            return
        record = {"step": step, "epoch": epoch, "loss": loss, **(parts or {}), "lr": lr, "img_s": round(ips, 2),
                  "input_wait": round(input_wait, 3)}
        self.input_waits.append(record["input_wait"])
        _append(self.file, self.out / METRICS, json.dumps(record) + "\n")
        if self.writer is not None:
            _board(self.out, lambda: [self.writer.add_scalar(f"train/{key}", record[key], step)
                                      for key in record.keys() - {"step", "epoch"}])
        self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=images_per_second(ips),
                             input_wait=f"{input_wait:.0%}", refresh=False)
        self.bar.update(step - self.bar.n)
        if self.lines and (step % self.every == 0 or step == self.total):
            print(f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.2e} img/s {images_per_second(ips)} "
                  f"input wait {input_wait:.0%}", flush=True)

    def evaluation(self, file: str, step: int, epoch: int, metrics: dict[str, float], extra: dict, at: str) -> None:
        """An evaluation: a record in ``file``, TensorBoard ``eval/KEY`` and one printed line, which names the
        evaluation's place as ``at`` ("end of epoch 1", "epoch 1" mid-epoch)."""
        if not self.active:
            return
        with open_in_place(self.out / file, "a") as handle:
            _append(handle, self.out / file, json.dumps({"step": step, "epoch": epoch, **metrics, **extra}) + "\n")
        # None: undefined (no such objects); a list (segment's per-class scores) or a dict (how segment evaluated) is
        # for the record only
        defined = {k: v for k, v in metrics.items() if v is not None and not isinstance(v, (list, dict))}
        if self.writer is not None:
            _board(self.out, lambda: [self.writer.add_scalar(f"eval/{key}", v, step) for key, v in defined.items()])
        shown = ", ".join(metric_text(k, v) for k, v in defined.items())
        best = [f"best {metric_value(k[5:], v)}" for k, v in extra.items() if k.startswith("best_")]
        shown = shown or "no metric defined: the validation split held nothing to score"
        message = f"step {step}, {at}: {shown}" + (f" ({best[0]})" if best else "")
        self.bar.write(message, file=sys.stdout)

    def close(self) -> None:
        for thing in (self.bar, self.file):
            if thing is not None:
                thing.close()
        if self.writer is not None:  # flushed first: what failed in TensorBoard's writer thread is raised there
            _board(self.out, lambda: (self.writer.flush(), self.writer.close()))

    def abandon(self) -> None:
        """:meth:`close` for a run stopped by an error, quietly: that error is the one to report. Each record was
        flushed as it was written; TensorBoard's writer writes what it still holds."""
        for thing in (self.bar, self.file):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.close()
        if self.writer is not None:
            _close_quietly(self.writer)


def _start_board(out: Path, start: int):
    """TensorBoard's writer of ``out/tb``, None without tensorboard (a dependency, but a run must not die for a log).
    A resumed run (``start`` > 0) hides what a killed one logged past its checkpoint, as metrics.jsonl is cut back."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        _quiet_board_threads()
        return _board(out, lambda: SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None))
    except ImportError:
        return None


def _board(out: Path, call: Callable):
    """``call()`` of TensorBoard's writer of ``out/tb``; a failed write (a full disk, a folder gone read-only) is an
    OSError naming that folder, as :func:`_append` makes one for metrics.jsonl (TensorBoard's names no file)."""
    try:
        return call()
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(out / "tb")) from None


def _close_quietly(writer) -> None:
    """Close TensorBoard's ``writer`` of a run that ended with an error: that error is the one to report."""
    with contextlib.suppress(Exception):
        writer.close()


def _quiet_board_threads() -> None:
    """TensorBoard's writer thread keeps the OSError of a failed write for the next write or flush to raise (then
    :func:`_board` names the folder), but ends with it too, and threading's hook would first print its traceback."""
    if getattr(threading.excepthook, "quiets_tensorboard", False):
        return
    previous = threading.excepthook

    def hook(args) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


def _append(handle, path: Path, text: str) -> None:
    """Write and flush ``text``; a failed write (a full disk, a folder gone read-only) names ``path``: the
    OSError of a write names no file, and without one the command could only show a traceback. The handle is
    then closed, its unwritten buffer dropped: a later close would fail on it again, naming nothing."""
    try:
        handle.write(text)
        handle.flush()
    except OSError as exc:
        with contextlib.suppress(OSError):
            handle.close()
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def read_records(path: Path) -> list[dict]:
    """The records of a run's log (``metrics.jsonl``, ``knn.jsonl``, ...; none when it is missing), as
    :func:`lomar.checkpoints.io.read_log` reads them: a line that is no JSON record with an integer ``step`` (a
    killed run can leave its last line torn, which only the run's resume cuts off) is skipped."""
    return [record for _, record in read_log(path)] if path.exists() else []


def input_limit_note(waits: list[float], workers: int | None, decode: str | None = None) -> str | None:
    """'the input limited this run: ...' with what to change, when the median of a run's per-step
    ``input_wait`` after its first step (which waits for the workers to start) is at least
    ``INPUT_BOUND``; None otherwise or with fewer than two steps."""
    waits = sorted(waits[1:])
    if not waits:
        return None
    median = waits[len(waits) // 2]
    if median < INPUT_BOUND:
        return None
    return (f"the input limited this run: the loop waited for batches {median:.0%} of a step's time (median "
            f"of {len(waits)} steps); try more --workers{'' if workers is None else f' (now {workers})'}"
            f"{_FASTER.get(decode, '')}")


def resume_hint(command: str, out: Path, processes: int) -> str:
    """The command that continues a stopped run; a resume must be launched with the run's number of processes."""
    launch = f" the same launch ({processes} processes, torchrun)" if processes > 1 else ""
    return f"Resume with{launch}: {command_line('lomar', command, '--out', out, '--resume', 'auto')}"
