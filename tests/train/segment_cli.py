"""`lomar segment` run in-process on the composed digits set with tiny settings, for the segment tests."""

from __future__ import annotations

from lomar.cli.app import main


def _segment(data, out, *extra) -> int:
    return main(["segment", "--data", str(data), "--num-classes", "10", "--img-size", "32", "--batch-size", "2",
                 "--head-channels", "16", "--warmup-steps", "1", "--lr", "1e-3", "--workers", "0", "--threads", "1",
                 "--device", "cpu", "--log-every", "1", "--out", str(out), *extra])
