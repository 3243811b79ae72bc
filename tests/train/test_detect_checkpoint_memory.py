"""A detector built from a `lomar detect` checkpoint holds its weights once: the checkpoint's own tensors (mapped from
the file and read as the model loads them) are let go once the model has them, not kept through the evaluation or
run, where they were a second copy of the detector in the process's memory (109 MB for ViT-Ti, all of the detector's
size for larger encoders)."""

from __future__ import annotations

import gc
import weakref

import torch
from coco_tiny import edited_coco

from helpers import detector_file
from lomar.checkpoints import kinds
from lomar.cli.app import main
from lomar.models.mask_rcnn import ViTMaskRCNN
from lomar.models.vit import VisionTransformer, model_config
from lomar.train import detect_config
from lomar.train.detect import DetectTask


def _as_the_detectors_categories(data):
    """The split's categories as detector_file's detector knows them: ids 1, 2, 5 named a, b, c."""
    data["categories"] = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]
    for ann in data["annotations"]:
        ann["category_id"] = {3: 1, 7: 2}[ann["category_id"]]


def test_the_checkpoints_tensors_are_let_go_once_the_detector_is_built(tiny, tmp_path, monkeypatch):
    _, (ann, images) = tiny
    val = edited_coco(ann, tmp_path, _as_the_detectors_categories)
    model = ViTMaskRCNN(VisionTransformer(model_config("vit_tiny_patch16", img_size=64, depth=1)), 3, 64)
    detector_file(tmp_path / "det.pt", model)
    refs, find = [], kinds.find_command_checkpoint

    def found(path, command):  # the one read DetectConfig.complete makes, its tensors watched
        checkpoint = find(path, command)
        refs.extend(weakref.ref(t) for t in checkpoint.checkpoint["model"].values())
        return checkpoint

    alive = []

    def evaluate(self):
        gc.collect()
        alive.append(sum(ref() is not None for ref in refs))
        return {}

    monkeypatch.setattr(detect_config, "find_command_checkpoint", found)
    monkeypatch.setattr(DetectTask, "evaluate", evaluate)
    assert main(["detect", "--eval-only", "--pretrained", str(tmp_path / "det.pt"), "--val-ann", val, "--val-images",
                 str(images), "--workers", "0", "--threads", str(torch.get_num_threads()), "--device", "cpu",
                 "--out", str(tmp_path / "ev")]) == 0
    assert len(refs) == len(model.state_dict()) and alive == [0]
