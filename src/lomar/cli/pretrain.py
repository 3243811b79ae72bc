"""``lomar pretrain``: flags and YAML -> config -> engine."""

from __future__ import annotations

from lomar.cli.common import training_command
from lomar.train.config import PretrainConfig

add_arguments, run = training_command(
    PretrainConfig, "lomar.train.pretrain:train",
    "With no --data, pretrains a tiny model on the photographs bundled with scikit-image (a few minutes on a CPU). "
    "Multi-GPU: torchrun --nproc_per_node G -m lomar pretrain ...")
