"""How a run's log prints its scores (lomar.train.monitor)."""

import math

import pytest

from lomar.train.monitor import metric_text


@pytest.mark.parametrize("key, value, said", [
    ("top1", 0.12, "top-1 12.00%"),  # an accuracy: a fraction, printed in percent
    ("knn_top1", 0.2, "k-NN top-1 20.00%"),
    # detect's and segment's scores are logged in percent: printed bare ('box_AP 0.04869', 'mIoU 2.265'), a user
    # read them as fractions, beside finetune's 'top-1 12.00%'
    ("box_AP", 0.04868506820220015, "box_AP 0.049%"),  # below 0.1 %, two significant digits: 0.05 hid one
    ("mask_AP", 0.004, "mask_AP 0.0040%"),  # two decimals would print a score as none (0.00%)
    ("top1", 0.0005, "top-1 0.050%"),
    ("box_AP50", 0.1, "box_AP50 0.10%"),
    ("mIoU", 0.0, "mIoU 0.00%"),
    ("mask_AP75", 51.25, "mask_AP75 51.25%"),
    ("mIoU", 2.2649, "mIoU 2.26%"),
    ("aAcc", 97.9, "aAcc 97.90%"),
    ("box_APl", None, "box_APl n/a"),  # undefined: no large object in the split
    ("mAcc", math.nan, "mAcc n/a"),
    ("score", 0.123456, "score 0.1235"),  # another score: as it is
])
def test_every_score_is_printed_with_its_unit(key, value, said):
    assert metric_text(key, value) == said
