"""``lomar segment``: flags and YAML -> SegmentConfig -> UperNet training and evaluation."""

from __future__ import annotations

import argparse
import sys

from lomar.cli.common import report_run_failure
from lomar.train.segment_config import add_segment_arguments, dump_segment_config, resolve_segment_config

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Data: lomar compose-digits --out DIR writes a small ADE20K-layout set (then --data DIR "
                     "--num-classes 10). Metrics (percent) go to OUT/metrics.jsonl; the last evaluation's "
                     "predictions to OUT/predictions/<stem>.png (class + 1).")
    add_segment_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = resolve_segment_config(args)  # a ConfigError is a UsageError: one line, exit 2
    if args.print_config:
        sys.stdout.write(dump_segment_config(config))
        return 0
    from lomar.train.run_state import SaveError  # torch: not for --help
    from lomar.train.segment import segment  # torch: not for --help

    try:
        return segment(config)
    except SaveError as exc:
        return report_run_failure("segment", exc)
