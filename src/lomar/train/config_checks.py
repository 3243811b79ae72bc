"""Range and consistency checks of pretraining settings that need no model (called by
:func:`lomar.train.config.validate`); each raises ConfigError naming the flag and the fix."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from lomar.train.settings import ConfigError

PretrainConfig = Any  # lomar.train.config.PretrainConfig (imported there; importing it here would be a cycle)

__all__ = ["check_data", "check_fsdp", "check_decode"]


def check_fsdp(config: PretrainConfig) -> None:
    """--fsdp shards across torchrun processes; refuse what the sharded path does not do."""
    if not config.fsdp:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise ConfigError("--fsdp shards the model across processes but this is a single process; launch with "
                          "torchrun --nproc-per-node N (N >= 2), or drop --fsdp")
    if config.precision == "fp16":
        raise ConfigError("--precision fp16 is not supported with --fsdp (its loss scaling is not wired for "
                          "sharded gradients); use --precision bf16 or fp32")
    if config.knn_every:
        raise ConfigError("--knn-every is not supported with --fsdp (the encoder is sharded); set --knn-every 0 "
                          "and run `lomar knn` on RUN/last.pt")


def check_data(data: str) -> None:
    """A folder or .txt list that exists, or a tar shard pattern that matches."""
    from lomar.data.shards import is_shard_pattern, shard_paths  # torch: not for --help

    if is_shard_pattern(data):
        try:
            shard_paths(data)
        except ValueError as exc:
            raise ConfigError(f"--data: {exc}") from None
    elif glob.has_magic(data) or "{" in data:
        if not Path(data).exists():  # a folder may have [ or { in its name
            raise ConfigError(f"--data {data}: a pattern must name .tar shards, e.g. shards/*.tar; "
                              f"for images pass their folder")
    elif not Path(data).exists():
        raise ConfigError(f"--data {data} does not exist; pass a folder of images, a .txt list "
                          f"or a tar shard pattern, or omit --data for the demo")


def check_decode(config: PretrainConfig) -> None:
    """--decode other than full reads image files one by one; windows needs LoMaR's windows, gpu a GPU."""
    if config.decode == "full":
        return
    from lomar.data.shards import is_shard_pattern  # torch: not for --help

    if config.data is not None and is_shard_pattern(config.data):
        raise ConfigError(f"--decode {config.decode} reads image files, not tar shards (--data {config.data}); "
                          f"use --decode full with shards")
    if config.decode == "windows" and (config.method != "lomar" or not config.windows):
        raise ConfigError(f"--decode windows resamples only LoMaR's windows, but this run is --method "
                          f"{config.method} with --windows {config.windows}; use --decode draft")
    if config.decode == "gpu" and config.device != "auto" and not config.device.startswith("cuda"):
        raise ConfigError(f"--decode gpu decodes JPEGs on a CUDA device, not --device {config.device}; "
                          f"use --decode draft on CPU")
