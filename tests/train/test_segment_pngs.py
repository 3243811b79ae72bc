"""`lomar segment`'s predictions/ (lomar.train.segment_pngs): the label maps of the last evaluation only, a user's own
files there kept, a kill midway leaving nothing of lomar's that the next evaluation does not clear."""

from __future__ import annotations

import shutil

import pytest
from segment_cli import scoring_task

from lomar.train import segment_pngs
from lomar.train.segment_pngs import WRITTEN, write_label_maps


def _names(folder, hidden: bool = True) -> list[str]:
    """The names in ``folder``; ``hidden``: its hidden files' too (lomar's list of what it wrote there)."""
    return sorted(path.name for path in folder.iterdir() if hidden or not path.name.startswith("."))


def test_an_evaluation_of_fewer_images_leaves_no_png_of_the_earlier_ones(tmp_path, digits64):
    """--eval-only --overwrite of a split without some image (or a run's evaluation that skipped it) removes the PNG
    an earlier evaluation wrote of it, which a user would take for this one's; the user's own files there stay."""
    full, fewer, out = digits64, tmp_path / "fewer", tmp_path / "out"
    shutil.copytree(full, fewer)
    gone = sorted((fewer / "images" / "validation").glob("*.jpg"))[0].stem
    (fewer / "images" / "validation" / f"{gone}.jpg").unlink()
    (fewer / "annotations" / "validation" / f"{gone}.png").unlink()
    scoring_task(full, out, run=False).evaluate()
    predictions = out / "predictions"
    stems = sorted(path.stem for path in (full / "images" / "validation").glob("*.jpg"))
    assert _names(predictions, hidden=False) == [f"{stem}.png" for stem in stems]
    (predictions / "mine.png").write_bytes(b"the user's")
    (predictions / "notes.txt").write_text("the user's")
    scoring_task(fewer, out, run=False).evaluate()
    assert _names(predictions, hidden=False) == sorted(["mine.png", "notes.txt",
                                                        *(f"{stem}.png" for stem in stems if stem != gone)])
    assert (predictions / "mine.png").read_bytes() == b"the user's"


def test_a_kill_midway_leaves_what_the_next_evaluation_clears(tmp_path, monkeypatch):
    """Killed between its PNGs, an evaluation leaves the earlier one's and some of its own, all listed: the next
    leaves its own alone. A list a user edited names nothing outside the folder lomar removes."""
    folder = tmp_path / "predictions"
    write_label_maps(folder, [("a", b"1"), ("b", b"1")])
    (folder / "mine.png").write_bytes(b"the user's")
    written, write = [], segment_pngs.atomic_write_bytes

    def killed_after_one(path, data):
        if written:
            raise KeyboardInterrupt  # as a kill: nothing after it runs
        written.append(path)
        return write(path, data)

    monkeypatch.setattr(segment_pngs, "atomic_write_bytes", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        write_label_maps(folder, [("c", b"2"), ("d", b"2")])
    monkeypatch.undo()
    assert _names(folder) == [WRITTEN, "a.png", "b.png", "c.png", "mine.png"]
    write_label_maps(folder, [("d", b"3")])
    assert _names(folder) == [WRITTEN, "d.png", "mine.png"]
    (tmp_path / "outside.png").write_bytes(b"x")
    (folder / WRITTEN).write_text('{"pngs": ["../outside.png", ".hidden.png", 3, "d.png"]}')
    write_label_maps(folder, [])
    assert _names(folder) == [WRITTEN, "mine.png"] and (tmp_path / "outside.png").exists()


def test_a_listed_map_reached_through_a_link_stays(tmp_path):
    """predict lists PNGs below its DIR (sub/x.png): one that a sub-folder made a link to elsewhere reaches, or a
    link itself, is the user's, not removed."""
    folder, theirs = tmp_path / "out", tmp_path / "theirs"
    write_label_maps(folder, [("sub/x", b"1"), ("y", b"1")])
    shutil.rmtree(folder / "sub")
    theirs.mkdir()
    (theirs / "x.png").write_bytes(b"the user's")
    (folder / "sub").symlink_to(theirs)
    (folder / "y.png").unlink()
    (folder / "y.png").symlink_to(theirs / "x.png")
    write_label_maps(folder, [])
    assert (theirs / "x.png").read_bytes() == b"the user's" and (folder / "y.png").is_symlink()


def test_a_sub_folder_its_removed_maps_leave_empty_goes_with_them(tmp_path):
    folder = tmp_path / "out"
    write_label_maps(folder, [("sub/deep/x", b"1"), ("kept/z", b"1"), ("y", b"1")])
    (folder / "kept" / "notes.txt").write_text("the user's")
    write_label_maps(folder, [("y", b"2")])
    assert _names(folder) == [WRITTEN, "kept", "y.png"] and _names(folder / "kept") == ["notes.txt"]


def test_the_pngs_of_a_folder_without_a_list_are_counted_as_left(tmp_path, capsys):
    """Without lomar's list, an earlier write's PNGs cannot be told from a user's: they stay, counted, once (the
    list written then names what lomar writes from there on)."""
    folder = tmp_path / "predictions"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png", ".hidden.png", "notes.txt"):
        (folder / name).write_bytes(b"earlier, or the user's")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "d.png").write_bytes(b"the user's")
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a link: the user's
    (folder / "e.png").symlink_to(tmp_path / "elsewhere" / "d.png")
    (folder / ".cache" / "deep").mkdir(parents=True)  # hidden: lomar lists nothing there
    (folder / ".cache" / "deep" / "f.png").write_bytes(b"the user's")
    (folder / "sub" / "deeper").mkdir()
    (folder / "sub" / "deeper" / "g.png").write_bytes(b"earlier, or the user's")
    assert write_label_maps(folder, [("a", b"1")]) == 3  # b.png, sub/c.png and sub/deeper/g.png
    assert write_label_maps(folder, [("a", b"1")]) == 0 and (folder / "b.png").exists()


def test_an_evaluation_into_predictions_without_a_list_notes_the_pngs_it_left(tmp_path, digits64, capsys):
    (predictions := tmp_path / "out" / "predictions").mkdir(parents=True)
    (predictions / "stale.png").write_bytes(b"an earlier evaluation's, or the user's")
    scoring_task(digits64, tmp_path / "out", run=False).evaluate()
    assert (f"lomar segment: note: 1 other PNG left in {predictions}, which lomar cannot tell from yours (it held no "
            f"{WRITTEN} listing the ones it wrote)") in capsys.readouterr().err
    assert (predictions / "stale.png").exists()
