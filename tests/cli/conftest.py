"""``tmp``: a folder holding the files and folders the bad invocations of the error tests name (a file that holds
no checkpoint, a plain file, a folder, a data root, an export without weights)."""

import pytest


@pytest.fixture
def tmp(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "file").write_text("a file\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "config.json").write_text("{}\n")
    return tmp_path
