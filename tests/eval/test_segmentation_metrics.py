"""lomar.eval.segmentation's per-class scores and their table, against a hand count."""

import math

import pytest
import torch

from lomar.eval.segmentation import lowest_classes, per_class_table, score_text, segmentation_metrics


def test_per_class_iou_and_acc_are_the_hand_count():
    # rows the true class, columns the predicted; class 3 is predicted but never labelled, class 4 nowhere
    confusion = torch.tensor([[6, 2, 0, 2, 0],
                              [1, 3, 0, 0, 0],
                              [0, 0, 5, 0, 0],
                              [0, 0, 0, 0, 0],
                              [0, 0, 0, 0, 0]])
    m = segmentation_metrics(confusion)
    # IoU = TP / (TP + FP + FN): 6/(6+1+4), 3/(3+2+1), 5/5, 0/(0+2+0); Acc = TP / labelled: 6/10, 3/4, 5/5
    assert m["IoU"][:4] == pytest.approx([600 / 11, 50.0, 100.0, 0.0]) and math.isnan(m["IoU"][4])
    assert m["Acc"][:3] == pytest.approx([60.0, 75.0, 100.0]) and all(math.isnan(v) for v in m["Acc"][3:])
    assert m["mIoU"] == pytest.approx((600 / 11 + 50 + 100 + 0) / 4) and m["mAcc"] == pytest.approx(235 / 3)


def test_the_table_and_the_lowest_classes():
    iou, acc, labels = [54.5454, None, 0.0, 100.0], [60.0, None, float("nan"), 100.0], ["1 wall", "2", "3", "4"]
    table = per_class_table(iou, acc, labels).splitlines()
    assert table[:2] == ["| class | IoU | Acc |", "|---|---:|---:|"]
    assert table[2:] == ["| 1 wall | 54.55 | 60.00 |", "| 2 | n/a | n/a |", "| 3 | 0.00 | n/a |",
                         "| 4 | 100.00 | 100.00 |"]
    assert lowest_classes(iou, labels) == "3: 0.00, 1 wall: 54.55, 4: 100.00"  # the undefined one left out
    assert lowest_classes(iou, labels, count=1) == "3: 0.00"
    # the one formatting of the table, the lowest-IoU line and lomar segment's score lines
    assert score_text(None) == score_text(float("nan")) == "n/a" and score_text(54.5454) == "54.55"
