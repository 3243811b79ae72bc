"""The pieces every checkpoint format shares: a source read once, encoder weights, the reader
interface and the registry the formats add themselves to (:mod:`lomar.checkpoints.formats` asks
them in priority order)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lomar.models.vit import ViTConfig

__all__ = ["Source", "EncoderWeights", "Reader", "register", "readers", "PRETRAIN_FORMAT", "CLASSIFIER_FORMAT"]

PRETRAIN_FORMAT = "lomar-pretrain-2"  # 2: `windows` is meant for every method (an MAE run saved 4 unused)
CLASSIFIER_FORMAT = "lomar-classifier-1"


@dataclass
class Source:
    """A checkpoint read once: its format, the raw dict and the state dict (``{}`` for an export)."""

    path: Path
    format: str
    data: dict
    state: dict


@dataclass
class EncoderWeights:
    """An encoder's architecture and weights under VisionTransformer key names."""

    config: ViTConfig
    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)  # source keys the encoder does not use
    source: str = ""  # "pretrain checkpoint (lomar)", "exported folder", "original checkpoint (mae)", ...


class Reader:
    """One checkpoint format. Subclasses set ``name`` and implement the three methods."""

    name = "?"

    def detect(self, data: dict, state: dict) -> bool:
        raise NotImplementedError

    def detect_folder(self, path: Path) -> bool:
        """Whether the folder ``path`` (holding a config.json) is this format."""
        return False

    def model(self, src: Source, overrides: dict) -> nn.Module:
        raise NotImplementedError

    def encoder(self, src: Source, overrides: dict) -> EncoderWeights:
        raise NotImplementedError


_READERS: list[tuple[int, Reader]] = []


def register(reader: Reader, priority: int) -> Reader:
    """Add a reader; lower priorities are asked first (the original-LoMaR fallback is 90)."""
    _READERS.append((priority, reader))
    _READERS.sort(key=lambda item: item[0])
    return reader


def readers() -> list[Reader]:
    return [reader for _, reader in _READERS]
