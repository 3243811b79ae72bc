"""Each task's evaluation puts its model in eval mode and gives it back the mode it had, by an exception too: a run
whose evaluation raises and goes on (a caught error, a test) trains on with its dropout and drop-path."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from lomar.train.detect import DetectTask
from lomar.train.distributed import DistInfo
from lomar.train.finetune import FinetuneTask
from lomar.train.segment import SegmentTask


class _Fails(torch.nn.Module):
    """A model whose forward raises, remembering the mode it was called in; ``transform`` stands for the
    detector's, whose mask pasting detect's evaluation switches off."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Dropout()
        self.transform = SimpleNamespace(paste_masks=True)
        self.called_training = None

    def forward(self, *args, **kwargs):
        self.called_training = self.training
        raise RuntimeError("the evaluation failed")


def _detect(model):
    task = DetectTask.__new__(DetectTask)
    task.model, task.device, task.info, task.categories = model, torch.device("cpu"), DistInfo(), [1]
    task.val_loader = [([torch.zeros(3, 8, 8)], [{"image_id": 1}])]
    return task


def _finetune(model):
    task = FinetuneTask.__new__(FinetuneTask)
    task.model, task.device, task.info, task.autocast = model, torch.device("cpu"), DistInfo(), contextlib.nullcontext
    task.val_loader, task.val_resize, task.small_counted = [(torch.zeros(1, 3, 8, 8), torch.tensor([0]))], 8, False
    return task


def _segment(model):
    task = SegmentTask.__new__(SegmentTask)
    task.model, task.device, task.info = model, torch.device("cpu"), DistInfo()
    task.config = SimpleNamespace(eval_stride=None, img_size=32, num_classes=2, eval_mode="whole", zero_label="ignore")
    task.val_set = [(torch.zeros(3, 32, 32), torch.zeros(32, 32, dtype=torch.long), "a")]
    return task


@pytest.mark.parametrize("make", [_detect, _finetune, _segment], ids=["detect", "finetune", "segment"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_an_evaluation_that_raises_leaves_the_model_in_the_mode_it_had(make, training):
    model = _Fails().train(training)
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        make(model).evaluate()
    assert model.called_training is False  # it did evaluate in eval mode
    assert model.training is training and model.head.training is training
    assert model.transform.paste_masks is True
