"""A search given a limit: it stops past that many distinct images, without listing a huge folder whole."""

import logging
import os

import lomar.data.image_search as image_search
from lomar.data.image_search import image_table, search_images


def _folder(path, count):
    path.mkdir(parents=True)
    for i in range(count):
        (path / f"{i:03d}.png").write_bytes(b"x")  # searched by name: no image is read


def test_a_limited_search_stops_at_the_folder_that_takes_it_past_the_limit(tmp_path, monkeypatch):
    for name in "abcd":
        _folder(tmp_path / name, 40)
    walked = []
    walk = image_search.walk
    monkeypatch.setattr(image_search, "walk", lambda *a: (walked.append(w[0]) or w for w in walk(*a)))
    assert len(search_images(tmp_path, limit=64)[0]) == 80  # a and b: c and d are not listed
    assert walked == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "b")]
    assert len(search_images(tmp_path, limit=160)[0]) == 160  # all of them, as without a limit
    assert len(image_table(tmp_path / "a", limit=40)) == 40


def test_links_to_images_listed_are_not_counted_again_by_a_limited_search(tmp_path, caplog):
    """a: 40 images, b: 40 links to them, c: 30 more: 70 distinct images, past a limit of 64 though a and b alone
    hold 80 paths; and a folder within the limit is listed whole, with its warnings."""
    _folder(tmp_path / "a", 40)
    (tmp_path / "b").mkdir()
    for i in range(40):
        os.symlink(tmp_path / "a" / f"{i:03d}.png", tmp_path / "b" / f"{i:03d}.png")
    _folder(tmp_path / "c", 30)
    assert len(image_table(tmp_path, limit=64)) == 70
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert len(image_table(tmp_path, limit=70)) == 70
    assert "40 symlink(s) lead to an image already listed" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lomar.data"):
        assert len(image_table(tmp_path, limit=69)) > 69
    assert caplog.text == ""  # a search stopped short warns of nothing: the caller refuses the folder
