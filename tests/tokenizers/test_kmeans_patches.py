"""k-means tokenizer edges: each patch normalised over its own pixels, the sizes it takes at their bounds, and the
messages that name a wrong one."""

from __future__ import annotations

import pytest
import torch

from lomar.tokenizers.kmeans import KMeansTokenizer, fit_kmeans_tokenizer, patch_features


def test_every_patch_is_normalised_over_its_own_pixels():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 12, generator=gen)
    images[:, :, :4, :4] = images[:, :, :4, :4] * 0.5 + 0.5  # one brighter patch beside ordinary ones
    feats = patch_features(images, 4)  # (2, 6, 48)
    assert feats.shape == (2, 6, 48)
    torch.testing.assert_close(feats.mean(-1), torch.zeros(2, 6), rtol=0, atol=1e-5)
    torch.testing.assert_close(feats.var(-1, unbiased=False), torch.ones(2, 6), rtol=0, atol=1e-3)
    # raster order: patch (row 0, col 1) holds the pixels of rows 0-3, columns 4-7
    patch = images[0, :, :4, 4:8].reshape(-1)
    torch.testing.assert_close(feats[0, 1], (patch - patch.mean()) / (patch.var(unbiased=False) + 1e-6).sqrt())


def test_an_image_that_is_no_whole_number_of_patches_is_named():
    with pytest.raises(ValueError, match=r"^image size 8x10 is not a multiple of patch=4; resize to a multiple"):
        patch_features(torch.rand(1, 3, 8, 10), 4)


@pytest.mark.parametrize("patch, input_size", [(1, 4), (4, 4)])
def test_the_patch_may_be_one_pixel_or_the_whole_view(patch, input_size):
    tokenizer = KMeansTokenizer(torch.randn(3, 3 * patch * patch), patch=patch, input_size=input_size)
    tokens = tokenizer._tokens(torch.rand(2, 3, input_size, input_size))
    assert tokens.shape == (2, (input_size // patch) ** 2)


@pytest.mark.parametrize("bad, says", [(dict(iters=2.5), r"iters=2\.5 must be an integer; use e\.g\. iters=20"),
                                       (dict(input_size=16.0), r"input_size=16\.0 must be an integer; use e\.g\. "
                                                               r"input_size=112")])
def test_a_count_that_is_no_integer_is_named_with_the_usual_value(bad, says):
    with pytest.raises(ValueError, match=rf"^{says}$"):
        fit_kmeans_tokenizer(torch.rand(2, 3, 16, 16), **{"vocab_size": 4, "patch": 8, "input_size": 16, **bad})


def test_a_cap_of_as_many_patches_as_there_are_takes_them_all_unshuffled():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # 8 patches of 8 px
    # one iteration from the seeded choice of 4 patches: a shuffle or one more draw moves the centroids
    every = fit_kmeans_tokenizer(images, vocab_size=4, patch=8, input_size=16, iters=1)
    capped = fit_kmeans_tokenizer(images, vocab_size=4, patch=8, input_size=16, iters=1, max_patches=8)
    assert torch.equal(capped.centroids, every.centroids)


def test_a_vocabulary_of_exactly_the_patches_fits_each_patch_its_own_code():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # 8 patches of 8 px
    tokenizer = fit_kmeans_tokenizer(images, vocab_size=8, patch=8, input_size=16, iters=2)
    assert sorted(tokenizer._tokens(images).flatten().tolist()) == list(range(8))
