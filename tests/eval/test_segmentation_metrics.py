"""lomar.eval.segmentation's per-class scores and their table, against a hand count."""

import math

import pytest
import torch

from lomar.eval.segmentation import (
    CLASS_CHUNK,
    confusion_matrix,
    label_map,
    lowest_classes,
    per_class_table,
    predict_logits,
    segmentation_metrics,
)
from lomar.models.segmenter import UperNetSegmenter
from lomar.models.vit import VisionTransformer, ViTConfig


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
    assert {type(v) for v in [m["mIoU"], m["mAcc"], m["aAcc"], *m["IoU"], *m["Acc"]]} == {float}  # JSON's numbers


def test_the_confusion_of_uint8_class_ids_is_counted_as_of_int64_ones():
    """Annotation PNGs read as uint8 (read_labels): true class x classes + predicted overflows uint8 past 255."""
    gen = torch.Generator().manual_seed(0)
    labels, pred = torch.randint(0, 150, (2, 40, 30), generator=gen)
    labels[:3] = 255
    counts = confusion_matrix(pred, labels, 150)
    assert counts.sum() == 37 * 30 and torch.equal(confusion_matrix(pred.byte(), labels.byte(), 150), counts)


def test_the_table_and_the_lowest_classes():
    iou, acc, labels = [54.5454, None, 0.0, 100.0], [60.0, None, float("nan"), 100.0], ["1 wall", "2", "3", "4"]
    text = per_class_table(iou, acc, labels)
    table = text.splitlines()
    assert text.endswith("|\n")  # a file's last line
    assert table[:2] == ["| class | IoU | Acc |", "|---|---:|---:|"]
    assert table[2:] == ["| 1 wall | 54.55 | 60.00 |", "| 2 | n/a | n/a |", "| 3 | 0.00 | n/a |",
                         "| 4 | 100.00 | 100.00 |"]
    assert lowest_classes(iou, labels) == "3: 0.00, 1 wall: 54.55, 4: 100.00"  # the undefined one left out
    assert lowest_classes(iou, labels, count=1) == "3: 0.00"
    assert lowest_classes([math.nan, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], list("abcdefgh")) == \
        "h: 1.00, g: 2.00, f: 3.00, e: 4.00, d: 5.00"  # five by default, NaN left out as None is
    # a class barely found keeps its digits, as the log's percent scores do (lomar.values.percent_text)
    assert per_class_table([0.0487], [0.004], ["1"]).splitlines()[2] == "| 1 | 0.049 | 0.0040 |"
    assert lowest_classes([0.0487, 2.0], ["a", "b"]) == "a: 0.049, b: 2.00"


def _coordinates(height: int, width: int) -> torch.Tensor:
    """An image (1, 3, height, width) whose channels 0 and 1 hold each pixel's row and column."""
    rows, cols = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    return torch.stack([rows, cols, torch.zeros_like(rows)])[None]


def test_sliding_windows_are_mmsegs_grid_and_their_logits_are_averaged_where_they_overlap():
    """mmseg's slide_inference on 50 x 70 with 32-pixel crops every 21: rows from 0 and 18 (the last flush with the
    border), columns from 0, 21 and 38, in that order whatever windows a forward takes. A model whose logits are its
    window's number shows each pixel's mean."""
    origins = []

    def model(crops):
        numbers = []
        for crop in crops:
            origins.append((int(crop[0, 0, 0]), int(crop[1, 0, 0])))
            numbers.append(torch.full((2, *crop.shape[-2:]), float(len(origins) - 1)))
        return torch.stack(numbers)

    logits = predict_logits(model, _coordinates(50, 70), 2, "slide", crop=32, stride=21)
    assert origins == [(0, 0), (0, 21), (0, 38), (18, 0), (18, 21), (18, 38)] and logits.shape == (1, 2, 50, 70)
    # (0, 0): window 0 alone; (49, 69): window 5 alone; (20, 25): windows 0, 1, 3 and 4; (10, 45): windows 1 and 2
    assert [float(logits[0, 1, r, c]) for r, c in ((0, 0), (49, 69), (20, 25), (10, 45))] == [0.0, 5.0, 2.0, 1.5]
    for side, starts in ((53, [0, 21]), (54, [0, 21, 22])):  # a window one stride on flush with the border or not
        origins.clear()
        predict_logits(model, _coordinates(side, 32), 2, "slide", crop=32, stride=21)
        predict_logits(model, _coordinates(32, side), 2, "slide", crop=32, stride=21)
        assert origins == [(start, 0) for start in starts] + [(0, start) for start in starts]
    origins.clear()  # by default mmseg's ADE20K windows: 512-pixel crops every 341
    predict_logits(model, _coordinates(600, 1000), 2, "slide")
    assert origins == [(0, 0), (0, 341), (0, 488), (88, 0), (88, 341), (88, 488)]


def test_sliding_windows_go_through_the_model_slide_pixels_at_a_time_with_one_window_a_forwards_logits(monkeypatch):
    """Six 32-pixel windows of a 50 x 70 image, four windows' pixels a forward: two forwards (4 and 2 windows), the
    logits those of one window a forward (a budget under one window's pixels) up to the last bits of batched GEMMs
    (7e-7 at most of logits near 1 measured for a trained tiny segmenter)."""
    import lomar.eval.segmentation as segmentation

    torch.manual_seed(0)
    encoder = VisionTransformer(ViTConfig(img_size=32, patch_size=16, embed_dim=16, depth=4, num_heads=2))
    model = UperNetSegmenter(encoder, num_classes=3, channels=8, aux_channels=8).eval()
    batches = []
    model.register_forward_pre_hook(lambda _, args: batches.append(tuple(args[0].shape)))
    image = torch.randn(1, 3, 50, 70)
    monkeypatch.setattr(segmentation, "SLIDE_PIXELS", 4 * 32 * 32)
    batched = predict_logits(model, image, 3, "slide", crop=32, stride=21)
    assert batches == [(4, 3, 32, 32), (2, 3, 32, 32)]
    batches.clear()
    monkeypatch.setattr(segmentation, "SLIDE_PIXELS", 1)
    single = predict_logits(model, image, 3, "slide", crop=32, stride=21)
    assert batches == [(1, 3, 32, 32)] * 6
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_whole_image_inference_pads_to_the_size_divisor_given_else_the_models_else_32():
    seen = []

    def model(image):
        seen.append(tuple(image.shape[-2:]))
        return image[:, :2]

    image = torch.randn(1, 3, 30, 45)
    assert torch.equal(predict_logits(model, image, 2, "whole"), image[:, :2])
    model.size_divisor = 16
    assert torch.equal(predict_logits(model, image, 2, "whole"), image[:, :2])
    assert torch.equal(predict_logits(model, image, 2, "whole", size_divisor=7), image[:, :2])
    assert seen == [(32, 64), (32, 48), (35, 49)]


def test_a_label_map_is_the_argmax_of_the_resized_logits_resized_a_chunk_of_classes_at_a_time(monkeypatch):
    """A photo's label map at its own size: its logits resized to it CLASS_CHUNK classes at a time, not all at once
    (150 ADE20K classes at 12 MP: 7.2 GB), with argmax's answer: the first of equal classes, NaN above all."""
    import lomar.eval.segmentation as segmentation

    logits = (torch.randn(1, 40, 6, 9, generator=torch.Generator().manual_seed(0)) * 2).round() / 2  # many ties
    logits[0, 37, 2, 3] = logits[0, 5, 4, 4] = math.nan
    resized = []
    interpolate = segmentation.F.interpolate
    monkeypatch.setattr(segmentation.F, "interpolate",
                        lambda x, **kw: resized.append(x.shape[1]) or interpolate(x, **kw))
    labels = label_map(lambda x: logits, torch.zeros(1, 3, 6, 9), (13, 20), 40, "whole", 6, 4)
    assert max(resized) == CLASS_CHUNK < 40
    whole = interpolate(logits, size=(13, 20), mode="bilinear", align_corners=False)[0]
    assert torch.equal(labels, whole.argmax(0)) and labels.dtype == torch.int64
    nan_alone = whole[37].isnan() & ~whole[:37].isnan().any(0)  # a NaN in a later chunk than the best number's
    assert nan_alone.any() and (labels[nan_alone] == 37).all()


def test_a_percent_of_counts_is_one_division_of_them():
    """29 of 100 pixels is 29.0 percent in metrics.jsonl, not 100 x 0.29 = 28.999999999999996."""
    m = segmentation_metrics(torch.tensor([[29, 71], [0, 100]]))
    assert m["Acc"] == [29.0, 100.0] and m["IoU"] == [29.0, 100 * 100 / 171] and m["mAcc"] == 64.5
