"""A path a run's checkpoint recorded relative is read under the folder that run was started in: the run folder less
the relative --out it recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lomar.checkpoints.kinds import SEGMENT_TASK
from lomar.cli.app import main
from lomar.train.recorded_paths import started_in


@pytest.mark.parametrize("out, start", [
    ("runs/seg", "/home/u/proj"), ("./runs/seg/", "/home/u/proj"), (".", "/home/u/proj/runs/seg"),
    ("/home/u/proj/runs/seg", None),  # recorded absolute: tells nothing
    ("other/seg", None),  # the run folder moved or renamed since
    ("../x/seg", None), (None, None), ("", None),
])
def test_the_folder_a_run_started_in_is_its_run_folder_less_its_relative_out(out, start):
    assert started_in(out, "/home/u/proj/runs/seg/last.pt") == (Path(start) if start else None)


def test_segment_eval_only_reads_data_recorded_relative_under_the_folder_its_run_started_in(tmp_path, capsys,
                                                                                         monkeypatch):
    (data := tmp_path / "proj" / "ade").mkdir(parents=True)
    (run := tmp_path / "proj" / "runs" / "seg").mkdir(parents=True)
    torch.save({"task": SEGMENT_TASK, "step": 2, "settings": {"data": "ade", "num_classes": 3, "img_size": 32,
                                                              "out": "runs/seg"}}, path := run / "last.pt")
    (tmp_path / "elsewhere" / "ade").mkdir(parents=True)  # another dataset under the same relative name
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["segment", "--eval-only", "--pretrained", str(path), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"] == str(data)


def test_segment_eval_only_of_data_gone_from_where_its_run_recorded_it_says_it_is_the_runs(tmp_path, capsys):
    """The --data the run recorded, read under the folder it started in, is gone: the refusal says whose it is, not
    '--data X is not a folder' of a flag never typed."""
    (run := tmp_path / "proj" / "runs" / "seg").mkdir(parents=True)
    torch.save({"task": SEGMENT_TASK, "step": 2, "settings": {"data": "ade", "num_classes": 3, "img_size": 32,
                                                              "out": "runs/seg"}}, path := run / "last.pt")
    assert main(["segment", "--eval-only", "--pretrained", str(path), "--out", str(tmp_path / "scores")]) == 2
    assert capsys.readouterr().err == (
        f"lomar segment: error: --eval-only scores {path} on the data its run scored, {tmp_path / 'proj' / 'ade'}, "
        f"which is not a folder now; pass --data ROOT of the dataset to score\n")
