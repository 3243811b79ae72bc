"""`lomar detect --eval-only` scores the validation split its detector's run scored unless given another, as
`segment --eval-only` takes its run's --data."""

from __future__ import annotations

import torch
import yaml

from lomar.checkpoints.kinds import DETECT_FORMAT, SEGMENT_TASK
from lomar.cli.app import main


def _detector(tmp_path):
    """A `lomar detect` checkpoint as far as the settings read it: its format and the run's settings."""
    (tmp_path / "coco" / "valid").mkdir(parents=True)
    (ann := tmp_path / "coco" / "valid.json").write_text("{}")
    path = tmp_path / "last.pt"
    torch.save({"format": DETECT_FORMAT, "step": 2, "settings": {"val_ann": str(ann), "img_size": 64,
                                                                "val_images": str(tmp_path / "coco" / "valid")}}, path)
    return path, ann


def test_eval_only_without_val_ann_scores_the_split_its_run_scored(tmp_path, capsys):
    # the checkpoint names both files: neither flag is needed
    path, ann = _detector(tmp_path)
    assert main(["detect", "--eval-only", "--pretrained", str(path), "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["val_ann"], resolved["val_images"]) == (str(ann), str(tmp_path / "coco" / "valid"))


def test_eval_only_given_val_ann_reads_its_images_where_that_file_says(tmp_path, capsys):
    path, _ = _detector(tmp_path)
    (other := tmp_path / "other.json").write_text("{}")
    assert main(["detect", "--eval-only", "--pretrained", str(path), "--val-ann", str(other), "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["val_ann"], resolved["val_images"]) == (str(other), str(tmp_path))  # not the run's folder


def test_eval_only_whose_runs_split_is_gone_says_so_and_names_the_flag(tmp_path, capsys):
    path, ann = _detector(tmp_path)
    ann.unlink()
    assert main(["detect", "--eval-only", "--pretrained", str(path), "--out", str(tmp_path / "scores")]) == 2
    assert capsys.readouterr().err == (f"lomar detect: error: --eval-only scores {path} on the split its run scored, "
                                       f"{ann}, which is not a file now; pass --val-ann FILE (and --val-images DIR) "
                                       f"of the split to score\n")


def test_eval_only_of_another_commands_checkpoint_without_val_ann_names_what_it_is(tmp_path, capsys):
    path = tmp_path / "seg.pt"  # not a detector: no --val-ann of its run to take
    torch.save({"task": SEGMENT_TASK, "settings": {}}, path)
    assert main(["detect", "--eval-only", "--pretrained", str(path), "--out", str(tmp_path / "scores")]) == 2
    assert capsys.readouterr().err == (f"lomar detect: error: --pretrained {path} is not a `lomar detect` run or "
                                       f"checkpoint; --eval-only scores a trained detector\n")


def test_eval_only_of_a_checkpoint_naming_no_split_asks_for_val_ann(tmp_path, capsys):
    path = tmp_path / "last.pt"  # a detector's settings holding no --val-ann: nothing of its run to score
    torch.save({"format": DETECT_FORMAT, "step": 2, "settings": {"val_ann": None, "img_size": 64}}, path)
    assert main(["detect", "--eval-only", "--pretrained", str(path), "--out", str(tmp_path / "scores")]) == 2
    assert capsys.readouterr().err == ("lomar detect: error: pass --val-ann FILE (COCO instances JSON) and "
                                       "--val-images DIR: the split AP is scored on\n")


def _relative_detector(tmp_path, out):
    """A detector whose run recorded its split relative (as lomar did before 2026-12-05) and its --out as ``out``,
    in ``tmp_path/proj/runs/det``; the run started in ``tmp_path/proj``, where its split is."""
    (tmp_path / "proj" / "coco" / "valid").mkdir(parents=True)
    (tmp_path / "proj" / "coco" / "valid.json").write_text("{}")
    (run := tmp_path / "proj" / "runs" / "det").mkdir(parents=True)
    torch.save({"format": DETECT_FORMAT, "step": 2, "settings": {"val_ann": "coco/valid.json", "img_size": 64,
                                                                "val_images": "coco/valid", "out": out}},
               path := run / "last.pt")
    return path


def test_eval_only_finds_a_split_recorded_relative_under_the_folder_its_run_started_in(tmp_path, capsys, monkeypatch):
    """That folder is the run folder less the --out the run recorded, not this working folder."""
    path = _relative_detector(tmp_path, "runs/det")
    (elsewhere := tmp_path / "elsewhere" / "coco").mkdir(parents=True)
    (elsewhere / "valid.json").write_text("{}")  # another split under the same relative name: not the run's
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["detect", "--eval-only", "--pretrained", str(path), "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    proj = tmp_path / "proj"
    assert (resolved["val_ann"], resolved["val_images"]) == (str(proj / "coco/valid.json"), str(proj / "coco/valid"))


def test_eval_only_of_a_split_recorded_relative_where_its_run_folder_does_not_tell_it(tmp_path, capsys, monkeypatch):
    """--out recorded absolute: the folder the run started in is not told, so a split of that relative name under
    this folder (maybe another dataset's) is not scored but named in the one-line refusal, as the fix."""
    path = _relative_detector(tmp_path, str(tmp_path / "proj" / "runs" / "det"))
    refusal = (f"lomar detect: error: --eval-only scores {path} on the split its run scored, coco/valid.json, recorded "
               f"relative to the folder that run was started in, which its checkpoint does not tell (the --out it "
               f"recorded, {tmp_path / 'proj' / 'runs' / 'det'}, is absolute); pass --val-ann FILE (and "
               f"--val-images DIR) of the split to score")
    monkeypatch.chdir(tmp_path)
    assert main(["detect", "--eval-only", "--pretrained", str(path), "--out", str(tmp_path / "scores")]) == 2
    assert capsys.readouterr().err == refusal + "\n"
    monkeypatch.chdir(tmp_path / "proj")
    assert main(["detect", "--eval-only", "--pretrained", str(path), "--print-config"]) == 2
    here = tmp_path / "proj" / "coco" / "valid.json"
    assert capsys.readouterr().err == f"{refusal}; this folder holds {here}: pass it if it is that one\n"


def test_eval_only_of_a_moved_run_folder_names_the_split_under_this_folder_without_scoring_it(tmp_path, capsys,
                                                                                             monkeypatch):
    """A run folder moved since its run (runs/det to old/det): its relative --out tells no folder, and the split of
    that relative name here is another dataset's as likely as the run's, so it is refused, not scored."""
    _relative_detector(tmp_path, "runs/det")
    (tmp_path / "proj" / "runs").rename(moved := tmp_path / "proj" / "old")
    monkeypatch.chdir(tmp_path / "proj")
    assert main(["detect", "--eval-only", "--pretrained", str(moved / "det" / "last.pt"), "--print-config"]) == 2
    assert capsys.readouterr().err.endswith(
        f"(its folder, {moved / 'det'}, does not end with the --out it recorded, runs/det: moved, renamed or copied "
        f"out since); pass --val-ann FILE (and --val-images DIR) of the split to score; this folder holds "
        f"{tmp_path / 'proj' / 'coco/valid.json'}: pass it if it is that one\n")
