"""What an epoch's end costs the input, through the real run lifecycle, with the costs emulated.

``lomar.train.lifecycle`` trains a toy task whose loader items take ``--item-ms`` each in the
workers (a photo's decoding) and whose step takes ``--step-ms`` (the device), both as sleeps, so
that 2 CPU cores can stand in for 14 workers and a GPU. Two runs over the same epochs: one loader
iterator for the whole run (:class:`lomar.train.epoch_stream.EpochStream`, the default), and a new iterator
per epoch, where each epoch's first batch waits for a worker to build a whole batch. Prints and
writes (``--json``) each run's sustained img/s and its longest waits.

    python benchmarks/epoch_stream.py --json benchmarks/epoch-stream-cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from lomar.data.samplers import EpochSampler
from lomar.train.lifecycle import run
from lomar.train.task import Task


@dataclasses.dataclass
class Config:  # what lomar.train.lifecycle.run reads
    COMMAND = "emulated"
    out: str = ""
    resume: str | None = None
    overwrite: bool = False
    device: str = "cpu"
    seed: int = 0
    threads: int | None = 1
    epochs: int = 4
    max_steps: int | None = None
    schedule_steps: int | None = None
    warmup_epochs: float = 0
    blr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 64
    accum_steps: int = 1
    precision: str = "fp32"
    log_every: int = 1000
    save_every: int = 1000


class Slow(Dataset):
    def __init__(self, size: int, item_s: float):
        self.size, self.item_s = size, item_s

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        time.sleep(self.item_s)
        return torch.ones(1)


def emulated_task(args, spanning: bool):
    class Emulated(Task):
        name = "emulated"

        def __init__(self, config, info, device):
            self.model = torch.nn.Linear(1, 1)
            dataset = Slow(args.steps_per_epoch * config.batch_size, args.item_ms / 1e3)
            self.train_loader = DataLoader(dataset, config.batch_size, drop_last=True, num_workers=args.workers,
                                           sampler=EpochSampler(len(dataset), config.seed), persistent_workers=True)

        def loss(self, batch):
            time.sleep(args.step_ms / 1e3)
            return self.net(batch).pow(2).mean()

        def set_epoch(self, epoch, skip_batches, epochs=1, batches=None):
            return super().set_epoch(epoch, skip_batches, epochs if spanning else 1, batches)
    return Emulated


def measure(args, spanning: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        config = Config(out=out, epochs=args.epochs, batch_size=args.batch_size)
        if run(config, emulated_task(args, spanning)) != 0:
            raise SystemExit("the emulated run failed")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = rows[1:]  # the first step waits for the workers to start
    seconds = [args.batch_size / r["img_s"] for r in rows]
    waits = sorted(s * r["input_wait"] for s, r in zip(seconds, rows))
    return dict(iterator="one for the run" if spanning else "one per epoch", steps=len(rows),
                images_per_s=len(rows) * args.batch_size / sum(seconds), longest_waits_s=waits[-args.epochs:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--item-ms", type=float, default=20.0, help="a worker's time per item")
    parser.add_argument("--step-ms", type=float, default=120.0, help="the device's time per step")
    parser.add_argument("--steps-per-epoch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    records = [measure(args, spanning) for spanning in (True, False)]
    ceiling = args.batch_size / (args.step_ms / 1e3)
    for r in records:
        print(f"{r['iterator']:16s} {r['images_per_s']:6.1f} img/s ({r['images_per_s'] / ceiling:.0%} of the "
              f"step's {ceiling:.0f}); longest waits {', '.join(f'{w:.2f}' for w in r['longest_waits_s'])} s")
    if args.json:
        args.json.write_text(json.dumps(dict(settings=vars(args) | {"json": str(args.json)}, step_images_per_s=ceiling,
                                              machine=platform.processor() or platform.machine(),
                                              records=records), indent=1) + "\n")


if __name__ == "__main__":
    main()
