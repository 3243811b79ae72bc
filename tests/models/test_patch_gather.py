"""The pixels LoMaR's windows read (:func:`lomar.models.objective.gather_patches`) on an image of other height than
width: the grid's row length is its width in patches, as :func:`~lomar.models.objective.patchify` lays it out."""

from __future__ import annotations

import torch

from lomar.models.masking import sample_plan, window_token_index
from lomar.models.objective import gather_patches, patchify


def test_gathered_window_pixels_are_patchifys_patches_on_a_wide_and_a_tall_image():
    p = 4
    for height, width in ((16, 28), (28, 16)):
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
        grid = (height // p, width // p)
        plan = sample_plan(2, grid, 3, 2, 0.5, generator=torch.Generator().manual_seed(1))
        image, top_left, _ = plan.flat()
        index = window_token_index(top_left, 3, grid[1])  # (R, 9)
        pixels = gather_patches(images, p, image, index)  # (R, 9, C, p, p)
        expected = patchify(images, p)[image[:, None], index]  # (R, 9, p*p*C), per patch (row, col, channel)
        assert torch.equal(pixels.permute(0, 1, 3, 4, 2).flatten(2), expected)
