"""Labelled train/ and val/ folders (two classes of 6 random images each) that the tiny studies pretrain and
evaluate on."""

from pathlib import Path

import pytest

from helpers import write_images


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(root / split / label, 6)
    return root
