"""`lomar finetune` run in-process with a tiny encoder on CPU, for the finetune tests."""

from __future__ import annotations

from lomar.cli.app import main


def _finetune(pretrained, folder, out, *extra) -> int:
    # no mixup, erasing, auto-augment, smoothing or drop path: only crops and flips are random
    return main(["finetune", "--pretrained", str(pretrained), "--data", str(folder), "--img-size", "32",
                 "--workers", "0", "--threads", "1", "--device", "cpu", "--log-every", "1", "--out", str(out),
                 "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "none", "--smoothing", "0",
                 "--drop-path", "0", "--precision", "fp32", *extra])
