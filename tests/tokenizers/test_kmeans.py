"""k-means patch tokenizer: determinism, nearest-centroid tokens, save/load, vocabulary limits."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lomar.tokenizers import KMeansTokenizer, Tokenizer, fit_kmeans_tokenizer, load_tokenizer
from lomar.tokenizers.kmeans import patch_features


def _images(n: int = 15, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(n, 3, 14, 14, generator=gen), size=112, mode="bilinear", align_corners=False)
    return (0.8 * low + 0.2 * torch.rand(n, 3, 112, 112, generator=gen)).clamp(0, 1)


def test_fit_is_deterministic_and_tokens_are_nearest_centroids():
    images = _images()
    tok = fit_kmeans_tokenizer(images, vocab_size=64, seed=3, iters=10)
    again = fit_kmeans_tokenizer(list(images), vocab_size=64, seed=3, iters=10)  # an iterable of images
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 64 and tok.grid == (14, 14)
    torch.testing.assert_close(tok.centroids, again.centroids, atol=0, rtol=0)
    tokens = tok.tokens(images[:4])
    assert tokens.shape == (4, 196) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 64
    feats = patch_features(images[:4], 8)
    brute = torch.cdist(feats, tok.centroids[None]).argmin(-1)
    assert (brute == tokens).float().mean() > 0.999  # float ties aside
    assert len(tokens.unique()) > 16  # the codes are used, not collapsed
    other = fit_kmeans_tokenizer(images, vocab_size=64, seed=4, iters=10)
    assert not torch.equal(other.centroids, tok.centroids)


def test_tokens_ignore_patch_brightness_and_contrast():
    images = _images(4, seed=1)
    tok = fit_kmeans_tokenizer(_images(), vocab_size=32, iters=5)
    assert torch.equal(tok.tokens(0.5 * images + 0.25), tok.tokens(images))


def test_save_load_round_trip(tmp_path):
    tok = fit_kmeans_tokenizer(_images(), vocab_size=32, iters=5)
    path = tok.save(tmp_path / "kmeans.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["kmeans.safetensors"]
    loaded = load_tokenizer(path)
    assert isinstance(loaded, KMeansTokenizer) and loaded.vocab_size == 32 and loaded.input_size == 112
    images = _images(3, seed=2)
    assert torch.equal(loaded.tokens(images), tok.tokens(images))


def test_vocabulary_larger_than_the_patches_is_an_error():
    with pytest.raises(ValueError, match=r"vocab_size=8192 .* 2940 patches.* at least 42 images"):
        fit_kmeans_tokenizer(_images(), vocab_size=8192)
    with pytest.raises(ValueError, match="112"):
        fit_kmeans_tokenizer(torch.rand(2, 3, 64, 64), vocab_size=8)
    tok = fit_kmeans_tokenizer(_images(2), vocab_size=8, iters=2)
    with pytest.raises(ValueError, match="112"):
        tok.tokens(torch.rand(1, 3, 224, 224))


@pytest.mark.parametrize("bad, named", [
    (dict(vocab_size=2.5), r"vocab_size=2\.5 must be an integer"),  # TypeError: slice indices must be integers
    (dict(iters=2.5), r"iters=2\.5 must be an integer"),
    (dict(patch=8.0), r"patch=8\.0 must be an integer"),  # TypeError from reshape()
    (dict(seed=1.5), r"seed=1\.5 must be an integer"),  # RuntimeError from manual_seed
    (dict(max_patches=0), "max_patches=0 must be >= 1, or None"),  # "pass vocab_size <= 0"
])
def test_fit_arguments_that_are_no_counts_are_named(bad, named):
    with pytest.raises(ValueError, match=named):
        fit_kmeans_tokenizer(torch.rand(2, 3, 16, 16), **{"vocab_size": 4, "patch": 8, "input_size": 16, **bad})


def test_numpy_integers_fit_as_python_ones():  # a seed from a config read back from a file
    images = torch.rand(2, 3, 16, 16)
    given = dict(vocab_size=np.int64(4), patch=np.int64(8), input_size=np.int64(16), iters=np.int64(3))
    tok = fit_kmeans_tokenizer(images, **given, seed=np.int64(5), max_patches=np.int64(6))
    plain = fit_kmeans_tokenizer(images, vocab_size=4, patch=8, input_size=16, iters=3, seed=5, max_patches=6)
    torch.testing.assert_close(tok.centroids, plain.centroids, atol=0, rtol=0)


def test_large_vocabulary_fits_quickly():
    tok = fit_kmeans_tokenizer(_images(), vocab_size=2048, iters=5)
    assert tok.centroids.shape == (2048, 192) and torch.isfinite(tok.centroids).all()


def test_uint8_pixels_are_refused_not_tokenized_as_saturated():
    tokenizer = KMeansTokenizer(torch.randn(4, 3 * 8 * 8), patch=8, input_size=16)
    with pytest.raises(ValueError, match=r"needs float images in \[0, 1\], got torch.uint8; divide uint8 pixels by"):
        tokenizer.tokens(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8))


def test_non_integer_patch_or_input_size_is_named():
    # a str patch raised "'<=' not supported between instances of 'int' and 'str'"
    with pytest.raises(ValueError, match="patch='8' and input_size=16 must be integers"):
        KMeansTokenizer(torch.randn(4, 3 * 8 * 8), patch="8", input_size=16)
