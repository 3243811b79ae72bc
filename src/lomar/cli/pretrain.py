"""``lomar pretrain``: flags and YAML -> config -> engine."""

from __future__ import annotations

import argparse
import sys

from lomar.cli.common import report_run_failure
from lomar.train.config import add_config_arguments, dump_config, resolve_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("With no --data, pretrains a tiny model on the photographs bundled with scikit-image "
                     "(a few minutes on a CPU). Multi-GPU: torchrun --nproc_per_node G -m lomar pretrain ...")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)  # a ConfigError is a UsageError: one line, exit 2
    if args.print_config:
        sys.stdout.write(dump_config(config))
        return 0
    from lomar.train.pretrain import TrainingError, train  # torch: not for --help
    from lomar.train.run_state import SaveError  # torch: not for --help

    try:
        return train(config)
    except (TrainingError, SaveError) as exc:
        return report_run_failure("pretrain", exc)
