"""`lomar predict`'s command line (lomar.cli.predict): what it cannot run or read is refused in one line naming the
fix (exit 2; a path that is not there before torch is imported: tests/cli/test_help_without_torch.py); an unreadable
image is skipped, warned of and counted; --out's prediction files are replaced only with --overwrite."""

from __future__ import annotations

import argparse
import shutil

import pytest

from helpers import CPU_RUN
from lomar.cli.app import build_parser, main


def _error(capsys, *argv: str, warned: int = 0) -> str:
    """The one line a refused `lomar predict ARGV` says (exit 2), after its ``warned`` warnings, written nothing to
    stdout."""
    capsys.readouterr()
    assert main(["predict", *argv, *CPU_RUN]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines(keepends=True)
    assert not out and len(lines) == warned + 1 and lines[-1].startswith("lomar predict: error: "), err
    assert all(line.startswith("lomar predict: warning: ") for line in lines[:-1]), err
    return lines[-1]


def test_a_checkpoint_that_predicts_nothing_names_the_command_that_takes_it(tmp_path, capsys, pretrained,
                                                                            labelled_folder):
    images = str(labelled_folder / "val")
    err = _error(capsys, str(pretrained), images, "--out", str(tmp_path / "out"))
    assert f"{pretrained} is a pretraining checkpoint, which predicts no labels; train a probe on it (lomar " \
           f"linprobe {pretrained} --data ROOT --save probe.pt, the quickest) and pass probe.pt" in err
    assert f"lomar finetune / detect / segment --pretrained {pretrained}" in err
    run = pretrained.parent  # a finished run's folder: its export, as every reader reads it
    err = _error(capsys, str(run), images, "--out", str(tmp_path / "out"))
    assert f"{run} is a pretraining run's folder, whose exported encoder predicts no labels; pass a probe on it " \
           f"(lomar linprobe {run} " in err
    spaced = tmp_path / "my runs" / "last.pt"  # the commands it names paste with such a path as one word
    spaced.parent.mkdir()
    shutil.copy(pretrained, spaced)
    err = _error(capsys, str(spaced), images, "--out", str(tmp_path / "out"))
    assert f"(lomar linprobe '{spaced}' --data ROOT --save probe.pt, the quickest)" in err
    assert f"--pretrained '{spaced}') and pass that run's best.pt; lomar visualize '{spaced}' IMAGE draws" in err
    assert main(["export", str(pretrained), "--to", str(tmp_path / "export")]) == 0
    err = _error(capsys, str(tmp_path / "export"), images, "--out", str(tmp_path / "out"))
    assert f"{tmp_path / 'export'} is an exported encoder, which predicts no labels; pass a probe on it (lomar " \
           f"linprobe {tmp_path / 'export'} --data ROOT --save probe.pt, the quickest) or the best.pt" in err
    assert not (tmp_path / "out").exists()


def test_the_help_names_every_kind_of_file_predict_runs():
    """`lomar predict --help` names what it takes as README does: a finetuned ViT's or BEiT's classifier, a detector,
    a segmenter, and a `lomar linprobe --save` file."""
    commands = next(a for a in build_parser(["predict"])._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(commands.choices["predict"].format_help().split())
    for kind in ("`lomar finetune` (a ViT's or a BEiT's classifier)", "`lomar detect`", "`lomar segment`",
                 "`lomar linprobe --save`", "or a linprobe --save file"):
        assert kind in text, (kind, text)


def test_paths_that_are_not_there_are_refused(tmp_path, capsys, classifier, labelled_folder):
    out = ["--out", str(tmp_path / "out")]
    assert f"checkpoint {tmp_path / 'no.pt'} does not exist" in _error(capsys, str(tmp_path / "no.pt"), ".", *out)
    err = _error(capsys, str(classifier), str(labelled_folder / "val"), str(tmp_path / "no.png"), *out)
    assert f"{tmp_path / 'no.png'} does not exist; pass image files or folders of images" in err
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    err = _error(capsys, str(classifier), str(tmp_path / "empty"), *out)
    assert f"no images found in {tmp_path / 'empty'}; supported extensions: " in err
    (tmp_path / "file").write_text("")
    assert "--out " + str(tmp_path / "file") + " is a file, not a folder" in _error(
        capsys, str(classifier), str(labelled_folder / "val"), "--out", str(tmp_path / "file"))


def test_unreadable_images_are_skipped_warned_of_and_counted(tmp_path, capsys, caplog, classifier, labelled_folder):
    images = tmp_path / "images"
    images.mkdir()
    good = sorted((labelled_folder / "val").rglob("*.png"))[:2]
    for i, path in enumerate(good):
        (images / f"{i}.png").write_bytes(path.read_bytes())
    (images / "broken.png").write_bytes(b"not a png")
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="lomar.data"):
        assert main(["predict", str(classifier), str(images), "--out", str(tmp_path / "out"), *CPU_RUN]) == 0
    assert "broken.png" in caplog.text
    out, err = capsys.readouterr()
    assert "lomar predict: 1 unreadable image skipped (each warned of above), e.g. " in err and "broken.png" in err
    assert f"lomar predict: warning: skipped image: cannot decode image {images / 'broken.png'}: " in err
    assert out == (f"lomar predict: 2 images (classifier {classifier / 'best.pt'}), top-2 of 2 classes, fp32 -> "
                   f"{tmp_path / 'out' / 'predictions.jsonl'}\n")
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 2
    (images / "0.png").unlink()
    (images / "1.png").unlink()
    err = _error(capsys, str(classifier), str(images), "--out", str(tmp_path / "none"), warned=1)
    assert "no image given could be read (1 tried; the first: " in err and not (tmp_path / "none").exists()


def test_predictions_in_out_are_replaced_only_with_overwrite(tmp_path, capsys, classifier, labelled_folder):
    image = str(next((labelled_folder / "val").rglob("*.png")))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.md").write_text("mine")
    assert main(["predict", str(classifier), image, "--out", str(tmp_path / "out"), *CPU_RUN]) == 0
    before = (tmp_path / "out" / "predictions.jsonl").read_text()
    (tmp_path / "out" / "predictions.jsonl").write_text("older")
    err = _error(capsys, str(classifier), image, "--out", str(tmp_path / "out"))
    assert f"{tmp_path / 'out' / 'predictions.jsonl'} already exists; pass --overwrite to replace it" in err
    assert main(["predict", str(classifier), image, "--out", str(tmp_path / "out"), "--overwrite", *CPU_RUN]) == 0
    assert (tmp_path / "out" / "predictions.jsonl").read_text() == before
    assert (tmp_path / "out" / "notes.md").read_text() == "mine"  # other files left alone


def test_two_images_that_would_write_one_label_map_are_refused(tmp_path):
    from lomar.cli.predict import _png_paths
    from lomar.errors import UsageError
    from lomar.eval.predict import list_images

    for folder in ("a", "b/c"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x.png").write_bytes(b"")
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    listed = list_images([str(tmp_path / "a"), str(tmp_path / "b")])
    assert [image.name for image in listed] == ["x", "x", "c/x"]  # below the folder given, without the suffix
    with pytest.raises(UsageError, match=r"a/x\.jpg and .*a/x\.png would both write .*/x\.png; predict them into"):
        _png_paths(tmp_path / "out", listed)
    assert _png_paths(tmp_path / "out", list_images([str(tmp_path / "a" / "x.png"), str(tmp_path / "b")])) == [
        tmp_path / "out" / "x.png", tmp_path / "out" / "c" / "x.png"]


def test_an_out_folder_inside_a_folder_of_images_is_refused(tmp_path, capsys):
    # as a training run's --out inside its --data: a segmenter's PNGs there would be images to a later predict
    photos = tmp_path / "photos"
    photos.mkdir()
    (tmp_path / "best.pt").write_bytes(b"")  # refused before the checkpoint is read
    for out in (photos, photos / "predicted"):
        err = _error(capsys, str(tmp_path / "best.pt"), str(photos), "--out", str(out))
        assert f"--out {out} is inside {photos}: the predictions would join the images a later lomar predict" in err
    assert not (photos / "predicted").exists()


def test_a_file_given_under_several_spellings_is_listed_once(tmp_path, monkeypatch):
    from lomar.eval.predict import list_images

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.png").write_bytes(b"")
    (tmp_path / "link.png").symlink_to(tmp_path / "photos" / "x.png")
    monkeypatch.chdir(tmp_path)
    given = ["photos/x.png", str(tmp_path / "photos" / "x.png"), str(tmp_path / "link.png"), str(tmp_path / "photos")]
    assert [image.path for image in list_images(given)] == ["photos/x.png"]


def test_a_killed_predicts_temporary_is_removed_by_the_next(tmp_path, capsys, classifier, labelled_folder):
    # atomic_write's temporary, as a predict killed while writing its file leaves it; the folder's other files stay,
    # hidden temporaries of other programs (--out a folder the user shares, the working folder) and of lomar's other
    # files among them: predict writes none of those
    image = str(next((labelled_folder / "val").rglob("*.png")))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".predictions.jsonl.tmp-4242-0123456789abcdef").write_text('{"path": "half')
    others = ["notes.md", ".notes.md.tmp", ".draft.tmp-4242", ".last.pt.tmp-4242-0123456789abcdef"]
    for name in others:
        (out / name).write_text("mine")
    assert main(["predict", str(classifier), image, "--out", str(out), *CPU_RUN]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([".lock", "predictions.jsonl", *others])
    assert "lomar predict: note: removed 1 stale temporary file(s)" in capsys.readouterr().err


def test_a_users_own_lock_named_file_in_out_is_refused_and_kept(tmp_path, capsys, classifier, labelled_folder):
    """DIR is the user's folder: a file of theirs named .lock there is refused in one line, not overwritten with
    predict's lock holder's name."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("where the spare keys are")
    err = _error(capsys, str(classifier), str(labelled_folder / "val"), "--out", str(out))
    assert f"{out / '.lock'} is not a lomar lock file (it holds 'where the spare keys are')" in err
    assert [p.name for p in out.iterdir()] == [".lock"] and (out / ".lock").read_text() == "where the spare keys are"
