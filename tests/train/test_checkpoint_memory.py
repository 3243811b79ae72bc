"""A model built from its command's checkpoint (`lomar detect`, `lomar segment`, `lomar finetune --eval-only
--pretrained RUN`) holds the weights once: the checkpoint's own tensors (mapped from the file and read as the model
loads them) are let go once the model has them, not kept through the evaluation or run as a second copy of the model
in the process's memory (109 MB for a ViT-Ti detector, all of the model's size for larger encoders).
The run's config keeps its read checkpoint (its path, settings and step) as the config's ``complete`` left it."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from coco_tiny import edited_coco

from helpers import CPU_RUN, detector_file, segmenter_file, write_images
from lomar.checkpoints import kinds
from lomar.checkpoints.io import atomic_save
from lomar.cli.app import main
from lomar.models.mask_rcnn import ViTMaskRCNN
from lomar.models.segmenter import UperNetSegmenter
from lomar.models.vit import VisionTransformer, model_config
from lomar.train import detect_config, finetune_config, segment_config
from lomar.train.detect import DetectTask
from lomar.train.finetune import FinetuneTask
from lomar.train.finetune_config import FinetuneConfig
from lomar.train.segment import SegmentTask


def _watched(monkeypatch, config_module, task: type, found_in: str, metrics: dict) -> SimpleNamespace:
    """The one read ``config_module``'s complete makes, its weights watched (weakrefs), and ``task``'s evaluation
    replaced by one that counts those still alive and keeps what the config holds then (its ``found_in``)."""
    seen = SimpleNamespace(refs=[], alive=[], held=[])
    find = kinds.find_command_checkpoint

    def found(path, command):
        checkpoint = find(path, command)
        seen.refs.extend(weakref.ref(t) for t in checkpoint.checkpoint["model"].values())
        return checkpoint

    def evaluate(self):
        gc.collect()
        seen.alive.append(sum(ref() is not None for ref in seen.refs))
        seen.held.append(getattr(self.config, found_in))
        return dict(metrics)

    monkeypatch.setattr(config_module, "find_command_checkpoint", found)
    monkeypatch.setattr(task, "evaluate", evaluate)
    return seen


def _kept_by_the_config(seen: SimpleNamespace, path) -> None:
    (held,) = seen.held
    assert held is not None and held.path == path and held.checkpoint["step"] == 2
    assert "model" not in held.checkpoint
    with pytest.raises(RuntimeError, match="read the file again"):  # not a second model silently built otherwise
        held.take()


def _as_the_detectors_categories(data):
    """The split's categories as detector_file's detector knows them: ids 1, 2, 5 named a, b, c."""
    data["categories"] = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]
    for ann in data["annotations"]:
        ann["category_id"] = {3: 1, 7: 2}[ann["category_id"]]


def test_a_detectors_checkpoint_tensors_are_let_go_once_it_is_built(tiny, tmp_path, monkeypatch):
    _, (ann, images) = tiny
    val = edited_coco(ann, tmp_path, _as_the_detectors_categories)
    model = ViTMaskRCNN(VisionTransformer(model_config("vit_tiny_patch16", img_size=64, depth=1)), 3, 64)
    detector_file(tmp_path / "det.pt", model)
    seen = _watched(monkeypatch, detect_config, DetectTask, "detector", {})
    assert main(["detect", "--eval-only", "--pretrained", str(tmp_path / "det.pt"), "--val-ann", val, "--val-images",
                 str(images), "--workers", "0", "--threads", str(torch.get_num_threads()), "--device", "cpu",
                 "--out", str(tmp_path / "ev")]) == 0
    assert len(seen.refs) == len(model.state_dict()) and seen.alive == [0]
    _kept_by_the_config(seen, tmp_path / "det.pt")


def test_a_segmenters_checkpoint_tensors_are_let_go_once_it_is_built(digits64, tmp_path, monkeypatch):
    encoder = VisionTransformer(model_config("vit_tiny_patch16", img_size=64, depth=4))
    model = UperNetSegmenter(encoder, 10, channels=16)
    segmenter_file(tmp_path / "seg.pt", model)
    seen = _watched(monkeypatch, segment_config, SegmentTask, "segmenter", {"mIoU": 0.0, "mAcc": 0.0, "aAcc": 0.0})
    assert main(["segment", "--eval-only", "--pretrained", str(tmp_path / "seg.pt"), "--data", str(digits64),
                 "--img-size", "64", "--out", str(tmp_path / "ev"), *CPU_RUN]) == 0
    assert len(seen.refs) == len(model.state_dict()) and seen.alive == [0]
    _kept_by_the_config(seen, tmp_path / "seg.pt")


def test_a_classifiers_checkpoint_tensors_are_let_go_once_it_is_built(tmp_path, monkeypatch):
    for label in ("a", "b"):
        write_images(tmp_path / "val" / label, 1, size=(32, 32))
    model = VisionTransformer(model_config("vit_tiny_patch16", img_size=32, depth=1), num_classes=2)
    task = SimpleNamespace(model=model, classes=["a", "b"], config=FinetuneConfig(img_size=32, precision="fp32"))
    atomic_save({"model": model.state_dict(), **FinetuneTask.state(task), "step": 2}, tmp_path / "cls.pt")
    seen = _watched(monkeypatch, finetune_config, FinetuneTask, "classifier", {})
    assert main(["finetune", "--eval-only", "--pretrained", str(tmp_path / "cls.pt"), "--val", str(tmp_path / "val"),
                 "--out", str(tmp_path / "ev"), *CPU_RUN]) == 0
    assert len(seen.refs) == len(model.state_dict()) and seen.alive == [0]
    _kept_by_the_config(seen, tmp_path / "cls.pt")
