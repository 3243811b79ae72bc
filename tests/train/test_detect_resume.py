"""`lomar detect --resume`: a resumed run ends with the weights and losses of one run straight through, and a
checkpoint of other categories is refused in one line before the images are checked and the model built."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from coco_tiny import edited_coco

from lomar.cli.app import main
from lomar.data.coco import read_coco
from lomar.errors import UsageError
from lomar.train.detect import DetectTask


@pytest.mark.longest
def test_detect_resume_is_exact(tiny, one_val, tmp_path, capsys, few_eval_proposals):
    """4 steps straight == 2 steps, then --resume auto to 4: same weights, same logged losses."""
    (train_ann, train_images), _ = tiny
    val_ann, val_images = one_val  # each run still evaluates, at the epoch's end and at its own
    common = ["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann", str(val_ann),
              "--val-images", str(val_images), "--model", "vit_mini_patch16", "--img-size", "64", "--batch-size", "2",
              "--schedule-steps", "4", "--warmup-steps", "1", "--rois-per-image", "16",
              "--workers", "2", "--threads", "1", "--device", "cpu", "--log-every", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    # --no-train-pos-embed is unused by this encoder (iRPE, no absolute table): said, and the weights the same
    assert main([*common, "--max-steps", "4", "--out", str(straight), "--no-train-pos-embed"]) == 0
    assert ("lomar detect: note: --no-train-pos-embed is unused: it acts on an absolute position table (MAE's), and "
            "this encoder has none\n") in capsys.readouterr().err
    assert main([*common, "--max-steps", "2", "--out", str(split)]) == 0, capsys.readouterr().err
    assert main(["detect", "--out", str(split), "--resume", "auto", "--max-steps", "4"]) == 0, capsys.readouterr().err
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    losses = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
              for run in (straight, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_a_resume_on_files_that_name_the_categories_otherwise_is_refused_in_one_line(tiny, tmp_path):
    # other annotation files may resume a run (their paths are run-control), other classes may not: a re-export
    # that numbered the same classes anew (square 7, disc 3) was resumed as the same set, labels silently swapped
    _, (ann, images) = tiny
    task = DetectTask.__new__(DetectTask)
    renumbered = [{"id": 3, "name": "disc"}, {"id": 7, "name": "square"}]  # its annotations too, in such a file
    task.val = read_coco(edited_coco(ann, tmp_path, lambda d: d.update(categories=renumbered)), images)
    task.categories = task.val.categories
    state = {"categories": [3, 7], "category_names": ["square", "disc"], "settings": {"val_ann": "/data/val.json"}}
    with pytest.raises(UsageError, match=r"^--resume: category 3 is 'square' in the checkpoint but 'disc' in .*"
                                         r"bad.json \(2 of 2 categories named otherwise.*--val-ann /data/val.json\)"):
        task.load(state)
    with pytest.raises(UsageError, match=r"category ids are \[3, 8\] in the checkpoint but \[3, 7\] in"):
        task.load({**state, "categories": [3, 8]})
    task.load({**state, "category_names": ["disc", "square"]})  # the same classes from other files: allowed
    task.load({"categories": [3, 7]})  # a checkpoint saved before names were kept: by its ids


def test_a_resume_of_other_categories_is_refused_before_the_images_are_checked_and_the_model_built(tiny,
                                                                                                   monkeypatch):
    from lomar.train import detect
    from lomar.train.distributed import DistInfo
    from lomar.train.task_resume import building

    def build(*args, **kwargs):  # a header read of every val image (0.8 GB for val2017), then the model
        raise AssertionError("the run was built")

    monkeypatch.setattr(detect, "check_split_images", build)
    monkeypatch.setattr(DetectTask, "_build_model", build)
    _, (ann, images) = tiny
    config = SimpleNamespace(val_ann=str(ann), val_images=str(images), eval_every=None, workers=0, pretrained=None)
    with building({"categories": [1, 2]}), pytest.raises(UsageError, match=r"^--resume: the category ids are \[1, "
                                                                           r"2\] in the checkpoint but \[3, 7\]"):
        DetectTask(config, DistInfo(), torch.device("cpu"))

