"""`lomar segment` run in-process on the composed digits set with tiny settings, for the segment tests."""

from __future__ import annotations

from pathlib import Path

import torch

from lomar.cli.app import main


def _segment(data, out, *extra) -> int:
    return main(["segment", "--data", str(data), "--num-classes", "10", "--img-size", "32", "--batch-size", "2",
                 "--head-channels", "16", "--warmup-steps", "1", "--lr", "1e-3", "--workers", "0", "--threads", "1",
                 "--device", "cpu", "--log-every", "1", "--out", str(out), *extra])


def scoring_task(data: Path, out: Path, run: bool):
    """A SegmentTask of ``data``'s validation split whose model is one 1x1 convolution, evaluating in this process
    (``run``: a training run's evaluation, not --eval-only's)."""
    from types import SimpleNamespace

    from lomar.data.segmentation import SegmentationFolder
    from lomar.train.distributed import DistInfo
    from lomar.train.segment import SegmentTask

    task = SegmentTask.__new__(SegmentTask)
    task.config = SimpleNamespace(num_classes=10, eval_mode="whole", eval_stride=None, img_size=32, eval_only=not run,
                                  zero_label="ignore", out=str(out), pretrained="seg.pt", seed=0, device="cpu",
                                  threads=torch.get_num_threads())  # --eval-only sets it: keep this process's
    task.info, task.device, task.source, task.class_labels = DistInfo(), torch.device("cpu"), {}, list("0123456789")
    task.val_set = SegmentationFolder(data, "validation", 10, 32, train=False, workers=1)
    task.val_folder = data / "images" / "validation"
    task.model = torch.nn.Conv2d(3, 10, 1)
    return task
