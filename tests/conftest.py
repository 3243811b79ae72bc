import os
from pathlib import Path

import pytest
import torch

from helpers import write_images

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts subprocesses or torchrun (make test-fast skips them)")


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """16 small random PNGs (40x48) in one folder."""
    return write_images(tmp_path_factory.mktemp("images"), 16)
