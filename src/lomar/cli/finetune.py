"""``lomar finetune``: flags and YAML -> FinetuneConfig -> the finetuning loop."""

from __future__ import annotations

import argparse
import sys

from lomar.cli.common import report_run_failure
from lomar.train.finetune_config import add_finetune_arguments, dump_finetune_config, resolve_finetune_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Multi-GPU: torchrun --nproc_per_node G -m lomar finetune ... (--batch-size is per process)."
    add_finetune_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = resolve_finetune_config(args)  # a ConfigError is a UsageError: one line, exit 2
    if args.print_config:
        sys.stdout.write(dump_finetune_config(config))
        return 0
    from lomar.train.finetune import finetune  # torch: not for --help
    from lomar.train.lifecycle import TrainingError  # torch: not for --help
    from lomar.train.run_state import SaveError  # torch: not for --help

    try:
        return finetune(config)
    except (TrainingError, SaveError) as exc:
        return report_run_failure("finetune", exc)
