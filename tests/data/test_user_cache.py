"""Where lomar keeps its cache files."""

import pytest

from lomar.data.user_cache import cache_folder


def test_the_cache_folder_is_lomar_cache_dir_else_xdg_cache_home_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LOMAR_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    monkeypatch.setenv("HOME", str(tmp_path / "c"))
    assert cache_folder("coco") == tmp_path / "a" / "coco"
    monkeypatch.setenv("LOMAR_CACHE_DIR", "")
    assert cache_folder("coco") == tmp_path / "b" / "lomar" / "coco"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_folder("segment") == tmp_path / "c" / ".cache" / "lomar" / "segment"


def test_no_home_folder_is_an_os_error_that_names_the_fix(no_home):
    with pytest.raises(OSError, match="no home folder .*; set LOMAR_CACHE_DIR to a folder this user may write"):
        cache_folder("segment")
