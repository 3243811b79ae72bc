"""``lomar pretrain``, ``finetune``, ``detect`` and ``segment``: flags and YAML -> the task's config -> its run."""

from __future__ import annotations

from lomar.cli.common import training_command
from lomar.train.config import PretrainConfig
from lomar.train.detect_config import DetectConfig
from lomar.train.finetune_config import FinetuneConfig
from lomar.train.segment_config import SegmentConfig

pretrain_add_arguments, pretrain_run = training_command(
    PretrainConfig, "lomar.train.pretrain:train",
    "With no --data, pretrains a tiny model on the photographs bundled with scikit-image (a few minutes on a CPU). "
    "Multi-GPU: torchrun --nproc_per_node G -m lomar pretrain ...")
finetune_add_arguments, finetune_run = training_command(
    FinetuneConfig, "lomar.train.finetune:finetune",
    "Multi-GPU: torchrun --nproc_per_node G -m lomar finetune ... (--batch-size is per process).")
detect_add_arguments, detect_run = training_command(
    DetectConfig, "lomar.train.detect:detect",
    "Data as detectron2 registers COCO sets: --train-ann/--val-ann instances JSON files, --train-images/--val-images "
    "their image folders. Writes metrics.jsonl (box_AP, mask_AP, ... in percent) and predictions.json (COCO results, "
    "masks as RLE).")
segment_add_arguments, segment_run = training_command(
    SegmentConfig, "lomar.train.segment:segment",
    "Data: lomar compose-digits --out DIR writes a small ADE20K-layout set (then --data DIR --num-classes 10). "
    "Metrics (percent) go to OUT/metrics.jsonl; the last evaluation's predictions to OUT/predictions/<stem>.png "
    "(class + 1; the class id with --zero-label class).")
