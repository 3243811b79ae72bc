"""``lomar segment``: flags and YAML -> SegmentConfig -> UperNet training and evaluation."""

from __future__ import annotations

from lomar.cli.common import training_command
from lomar.train.segment_config import SegmentConfig

__all__ = ["add_arguments", "run"]

add_arguments, run = training_command(
    SegmentConfig, "lomar.train.segment:segment",
    "Data: lomar compose-digits --out DIR writes a small ADE20K-layout set (then --data DIR --num-classes 10). "
    "Metrics (percent) go to OUT/metrics.jsonl; the last evaluation's predictions to OUT/predictions/<stem>.png "
    "(class + 1).")
