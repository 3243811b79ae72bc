"""Run monitoring: metrics.jsonl, TensorBoard scalars, and a progress bar or plain lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["Monitor"]


class Monitor:
    """metrics.jsonl + TensorBoard + a progress bar (or plain lines when not on a terminal)."""

    def __init__(self, out: Path, active: bool, total: int, log_every: int):
        self.active, self.every, self.total, self.out = active, log_every, total, out
        self.bar = self.writer = self.file = None
        if not active:
            return
        self.file = open(out / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"))
        except ImportError:  # tensorboard is a dependency, but a run must not die for a log
            self.writer = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="pretrain", dynamic_ncols=True, file=sys.stdout)

    def step(self, step: int, epoch: int, loss: float, lr: float, ips: float) -> None:
        if not self.active:
            return
        record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "img_s": round(ips, 2)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key in ("loss", "lr", "img_s"):
                self.writer.add_scalar(f"train/{key}", record[key], step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.2e} "
                  f"img/s {ips:.1f}", flush=True)

    def knn(self, step: int, epoch: int, top1: float) -> None:
        """A k-NN evaluation (``--knn-every``): knn.jsonl, TensorBoard and one printed line."""
        if not self.active:
            return
        with open(self.out / "knn.jsonl", "a") as file:
            file.write(json.dumps({"step": step, "epoch": epoch, "knn_top1": top1}) + "\n")
        if self.writer is not None:
            self.writer.add_scalar("eval/knn_top1", top1, step)
        message = f"epoch {epoch} step {step}: k-NN top-1 {100 * top1:.2f}%"
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        for thing in (self.bar, self.writer, self.file):
            if thing is not None:
                thing.close()
