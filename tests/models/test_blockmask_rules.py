"""The blockwise generator's placement rules that the reference masks (one square grid, the original's arguments)
do not exercise: a block never spans the grid's full height or width, ``max_num_patches`` caps what one block adds,
and a grid of other height than width is covered over its whole width. The draws are scripted, so each rule is
seen on one round."""

from __future__ import annotations

import math
import random

import torch

from lomar.models.blockmask import BlockMaskGenerator


class _Scripted(random.Random):
    """A stream of chosen draws: each round's attempt is ``uniform`` for the area, ``uniform`` for the log aspect,
    then ``randint`` for the top and the left. Past the script an attempt asks for a block far larger than any
    grid, so the round places nothing and the mask is done."""

    def __init__(self, attempts: list[tuple[float, float]], corners: list[int]):
        super().__init__(0)
        self.draws = [value for area, aspect in attempts for value in (area, math.log(aspect))]
        self.corners = list(corners)
        self.calls = 0

    def uniform(self, a, b):
        self.calls += 1
        if self.draws:
            return self.draws.pop(0)
        return 1e4 if self.calls % 2 else 0.0

    def randint(self, a, b):
        value = self.corners.pop(0) if self.corners else a
        assert a <= value <= b, f"randint({a}, {b}) cannot give {value}"
        return value


def _block(shape, rows, cols) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def test_a_block_never_spans_the_full_height_of_the_grid():
    # attempt 1 is a 14x1 column (area 14, aspect 14): as tall as the grid, refused; attempt 2 a 7x2 block
    rng = _Scripted([(14.0, 14.0), (14.0, 3.5)], corners=[0, 0])
    mask = BlockMaskGenerator(14, 14, min_num_patches=14, min_aspect=0.05, rng=rng)()
    assert torch.equal(mask, _block((14, 14), slice(0, 7), slice(0, 2)))
    rng = _Scripted([(14.0, 1 / 14), (14.0, 1 / 3.5)], corners=[0, 0])  # a 1x14 row, refused; then 2x7
    mask = BlockMaskGenerator(14, 14, min_num_patches=14, min_aspect=0.05, rng=rng)()
    assert torch.equal(mask, _block((14, 14), slice(0, 2), slice(0, 7)))


def test_max_num_patches_caps_what_one_block_adds():
    # attempt 1: a 4x4 block, 16 new patches past the cap of 4 (the target, 20, would allow it); attempt 2: 2x2
    rng = _Scripted([(16.0, 1.0), (4.0, 1.0)], corners=[0, 0, 0, 0])
    mask = BlockMaskGenerator(14, 20, min_num_patches=4, max_num_patches=4, rng=rng)()
    assert torch.equal(mask, _block((14, 14), slice(0, 2), slice(0, 2)))


def test_a_grid_wider_than_tall_is_masked_across_its_whole_width():
    masks = torch.stack([BlockMaskGenerator((4, 12), 16, min_num_patches=4, seed=s)() for s in range(20)])
    assert masks.shape == (20, 4, 12)
    assert 0 < int(masks.flatten(1).sum(1).min()) and int(masks.flatten(1).sum(1).max()) <= 16
    columns, rows = masks.any(1).any(0), masks.any(2).any(0)
    assert bool(columns.all()) and bool(rows.all())  # blocks reach the last of 12 columns and of 4 rows
