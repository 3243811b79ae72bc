import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_DEFAULT_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def reference_dir() -> Path:
    return Path(os.environ.get("LOMAR_REFERENCE_DIR", _DEFAULT_REFERENCE))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)
