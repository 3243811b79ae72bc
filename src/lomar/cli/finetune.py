"""``lomar finetune``: flags and YAML -> FinetuneConfig -> the finetuning loop."""

from __future__ import annotations

from lomar.cli.common import training_command
from lomar.train.finetune_config import FinetuneConfig

add_arguments, run = training_command(
    FinetuneConfig, "lomar.train.finetune:finetune",
    "Multi-GPU: torchrun --nproc_per_node G -m lomar finetune ... (--batch-size is per process).")
