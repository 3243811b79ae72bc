"""``lomar detect``: flags and YAML -> DetectConfig -> Mask R-CNN training or evaluation on COCO files."""

from __future__ import annotations

from lomar.cli.common import training_command
from lomar.train.detect_config import DetectConfig

add_arguments, run = training_command(
    DetectConfig, "lomar.train.detect:detect",
    "Data as detectron2 registers COCO sets: --train-ann/--val-ann instances JSON files, --train-images/--val-images "
    "their image folders. Writes metrics.jsonl (box_AP, mask_AP, ... in percent) and predictions.json (COCO results, "
    "masks as RLE).")
