"""``lomar detect``: flags and YAML -> DetectConfig -> Mask R-CNN training or evaluation on COCO files."""

from __future__ import annotations

import argparse
import sys

from lomar.cli.common import report_run_failure
from lomar.train.detect_config import add_detect_arguments, dump_detect_config, resolve_detect_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Data as detectron2 registers COCO sets: --train-ann/--val-ann instances JSON files, "
                     "--train-images/--val-images their image folders. Writes metrics.jsonl (box_AP, mask_AP, ... "
                     "in percent) and predictions.json (COCO results, masks as RLE).")
    add_detect_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = resolve_detect_config(args)  # a ConfigError is a UsageError: one line, exit 2
    if args.print_config:
        sys.stdout.write(dump_detect_config(config))
        return 0
    from lomar.train.detect import detect  # torch: not for --help
    from lomar.train.run_state import SaveError  # torch: not for --help

    try:
        return detect(config)
    except SaveError as exc:
        return report_run_failure("detect", exc)
