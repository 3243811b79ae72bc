"""Blockwise masking: exact masks of the original generator on every ``blockmask_meta.json`` case,
its statistics, window scaling and argument checks."""

import json
import random

import numpy as np
import pytest
import torch

from helpers import reference_cases, require_reference
from lomar.models.blockmask import BlockMaskGenerator, block_mask_batch, window_blockmask_args

META = "blockmask_meta.json"


def _load(case):
    require_reference(case)
    meta = json.loads((case / META).read_text())
    data = np.load(case / "blockmask.npz")

    def make(seed: int) -> BlockMaskGenerator:
        return BlockMaskGenerator(meta["input_size"], meta["num_masking_patches"], meta["min_num_patches"],
                                  meta.get("max_num_patches"), meta.get("min_aspect", 0.3), meta.get("max_aspect"),
                                  seed=seed)
    return meta, data, make


@pytest.mark.parametrize("case", reference_cases(META))
def test_masks_and_stream_are_exact(case):
    meta, data, make = _load(case)
    masks = np.stack([make(int(s))().numpy() for s in data["seeds"]])
    assert masks.dtype == bool and np.array_equal(masks, data["masks"])
    assert np.array_equal(masks.reshape(len(masks), -1).sum(1), data["counts"])
    assert data["counts"].tolist() == meta["counts"]
    gen = make(meta["stream"]["seed"])
    stream = np.stack([gen().numpy() for _ in range(meta["stream"]["calls"])])
    assert np.array_equal(stream, data["stream_masks"])
    assert np.array_equal(stream.reshape(len(stream), -1).sum(1), data["stream_counts"])


@pytest.mark.parametrize("case", reference_cases(META))
def test_statistics(case):
    meta, data, make = _load(case)
    stats = meta["stats"]
    gen = make(stats["seed"])  # the same stream, so the bounds below hold without chance failures
    masks = block_mask_batch(gen, n=stats["n"]).view(stats["n"], *gen.shape)
    counts = masks.flatten(1).sum(1)
    target = meta["num_masking_patches"]
    assert int(counts.max()) <= target
    hist = data["stats_count_hist"]
    ref_mean = float((np.arange(len(hist)) * hist).sum() / hist.sum())
    assert abs(counts.float().mean().item() - ref_mean) < 0.3
    assert abs((counts == target).float().mean().item() - hist[target] / hist.sum()) < 0.05
    freq = masks.double().mean(0).numpy()
    assert np.abs(freq - data["stats_position_freq"]).max() < 0.035  # the README's 3 s.e. at 2000 masks
    if "mean_count" in stats:
        assert abs(counts.float().mean().item() - stats["mean_count"]) < 0.3


def test_window_args_and_batches():
    assert window_blockmask_args(14) == dict(input_size=14, num_masking_patches=75, min_num_patches=16,
                                             max_num_patches=None, min_aspect=0.3, max_aspect=None)
    args = window_blockmask_args(7)
    assert (args["num_masking_patches"], args["min_num_patches"]) == (19, 4)
    # K = 7 and 14 give the same counts scaled by K²/197; K = 17 does not (16 x 289 / 196 = 23.59 -> 24, / 197 -> 23)
    assert (window_blockmask_args(17)["num_masking_patches"], window_blockmask_args(17)["min_num_patches"]) == (111, 24)
    gens = [BlockMaskGenerator(**args, seed=s) for s in range(3)]
    batch = block_mask_batch(gens)
    assert batch.shape == (3, 49) and batch.dtype == torch.bool
    assert batch.sum(1).max() <= 19
    assert torch.equal(batch[1], BlockMaskGenerator(**args, seed=1)().flatten())


def test_does_not_touch_global_random():
    random.seed(5)
    before = random.random()
    random.seed(5)
    BlockMaskGenerator(14, 75, 16, seed=0)()
    assert random.random() == before


@pytest.mark.parametrize("kwargs, word", [(dict(num_masking_patches=0), "num_masking_patches=0"),
                                          (dict(num_masking_patches=300), "num_masking_patches=300"),
                                          (dict(min_num_patches=0), "min_num_patches=0"),
                                          (dict(min_aspect=0), "min_aspect=0"),
                                          (dict(min_aspect=0.5, max_aspect=0.2), "max_aspect=0.2"),
                                          # raw TypeError / unpacking error / OverflowError at the first draw
                                          (dict(input_size=14.0), r"input_size=14\.0 must be a positive integer"),
                                          (dict(input_size=(14,)), r"input_size=\(14,\) must be"),
                                          (dict(num_masking_patches=75.5), r"num_masking_patches=75\.5 must be"),
                                          (dict(max_aspect=float("inf")), "max_aspect=inf must be a finite number")])
def test_argument_checks(kwargs, word):
    with pytest.raises(ValueError, match=word):
        BlockMaskGenerator(**{"input_size": 14, "num_masking_patches": 75, "min_num_patches": 16, **kwargs})
    with pytest.raises(ValueError, match="K=2 is too small .* K >= 3"):
        window_blockmask_args(2)
    with pytest.raises(ValueError, match="n=None"):
        block_mask_batch(BlockMaskGenerator(14, 75))
