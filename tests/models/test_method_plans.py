"""What a method's plan is drawn from: the placement it is asked for (both in-window maskings), a fresh blockwise
draw per batch from its generator, blockwise masks handed to windows image-major, and the permutation placement's
bound on a grid of more rows than columns."""

from __future__ import annotations

import random

import pytest
import torch

from lomar.models.blockmask import BlockMaskGenerator, window_blockmask_args
from lomar.models.masking import MaskingPlan, WindowsDoNotFit, max_windows, sample_plan
from lomar.models.windows import sample_method_plan, with_block_masks


@pytest.mark.parametrize("mask_ratio", [0.75, None])
def test_a_method_plan_places_its_windows_as_asked(mask_ratio):
    grid, k, n = (10, 10), 3, 4

    def shares_a_row_or_column(placement):  # (64,) True where two of an image's windows share a top row or left column
        top_left = sample_method_plan(64, grid, k, n, mask_ratio, torch.Generator().manual_seed(5), placement).top_left
        return torch.tensor([len(set(t[:, 0].tolist())) < n or len(set(t[:, 1].tolist())) < n for t in top_left])

    assert not shares_a_row_or_column("permutation").any()  # the original's: distinct rows and distinct columns
    assert shares_a_row_or_column("distinct").any()  # distinct cells only
    # 8 top rows hold at most 8 windows placed as the original places them; 9 distinct cells fit
    with pytest.raises(WindowsDoNotFit, match="num_windows <= 8"):
        sample_method_plan(1, grid, k, 9, mask_ratio, torch.Generator().manual_seed(0), "permutation")
    assert sample_method_plan(1, grid, k, 9, mask_ratio, torch.Generator().manual_seed(0), "distinct").num_windows == 9


def test_blockwise_masks_are_drawn_afresh_for_each_batch_from_the_generator():
    grid, k, n = (12, 12), 6, 2
    generator = torch.Generator().manual_seed(0)
    first, second = (sample_method_plan(4, grid, k, n, None, generator) for _ in range(2))
    assert not torch.equal(first.mask, second.mask)  # the next batch's masks are new ones
    again = sample_method_plan(4, grid, k, n, None, torch.Generator().manual_seed(0))
    assert torch.equal(again.mask, first.mask) and torch.equal(again.top_left, first.top_left)
    other = sample_method_plan(4, grid, k, n, None, torch.Generator().manual_seed(1))
    assert not torch.equal(other.mask, first.mask)


def test_block_masks_go_to_windows_image_major_in_the_streams_order():
    k, n_img, n_win = 7, 3, 2
    plan = sample_plan(n_img, (14, 14), k, n_win, 0.5, generator=torch.Generator().manual_seed(0))
    masked = with_block_masks(plan, random.Random(11))
    generator = BlockMaskGenerator(**window_blockmask_args(k), rng=random.Random(11))
    expected = torch.stack([generator().flatten() for _ in range(n_img * n_win)]).view(n_img, n_win, k * k)
    assert isinstance(masked, MaskingPlan) and torch.equal(masked.mask, expected)
    assert torch.equal(masked.top_left, plan.top_left)


def test_the_permutation_bound_is_the_fewer_of_rows_and_columns():
    grid, k = (6, 10), 3  # 4 top rows, 8 left columns
    assert max_windows(grid, k, "permutation") == 4 and max_windows(grid, k, "distinct") == 32
    assert max_windows((10, 6), k, "permutation") == 4
    with pytest.raises(WindowsDoNotFit, match="hold at most 4; pass num_windows <= 4"):
        sample_plan(1, grid, k, 5, 0.5, placement="permutation")
