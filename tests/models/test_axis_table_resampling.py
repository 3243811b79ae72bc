"""ViTDet's per-axis tables at another length (:func:`lomar.models.relpos.resize_axis_table`): ViTDet's
``get_rel_pos`` resamples them linearly with PyTorch's default ``align_corners=False``: entry j of the new table
reads the old one at (j + 1/2)·n/m − 1/2, clamped to its ends."""

from __future__ import annotations

import pytest
import torch

from lomar.models.relpos import resize_axis_table


@pytest.mark.parametrize("old, new", [(5, 9), (9, 5), (3, 13)])
def test_an_axis_table_is_read_at_its_cell_centres(old, new):
    table = torch.arange(float(old))[:, None] * torch.tensor([1.0, -2.0])  # a ramp per column
    at = [min(max((j + 0.5) * old / new - 0.5, 0.0), old - 1.0) for j in range(new)]
    expected = torch.tensor(at)[:, None] * torch.tensor([1.0, -2.0])
    torch.testing.assert_close(resize_axis_table(table, new), expected, rtol=0, atol=1e-5)
