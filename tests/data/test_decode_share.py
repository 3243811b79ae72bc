"""--decode gpu with the workers' help (lomar.data.decode_share): the balance of the two decoders,
the share read by real loader workers, and mixed batches that keep every sample's draws."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lomar.data.decode_share import PROBE_SHARE, WORKER_HEADROOM, DecodeShare, balanced_share
from lomar.data.device_decode import DeviceDecode, EncodedPretrainDataset, collate_encoded, decode_dataset
from lomar.data.fast_decode import FastPretrainDataset
from lomar.data.folder import build_pretrain_dataset
from lomar.methods import get_method

SIZE = 64


def test_the_balanced_share_equalises_the_two_rates():
    rng = random.Random(0)
    for _ in range(200):
        workers, t_pass, t_draft, t_device = rng.uniform(1, 32), rng.uniform(1e-4, 0.01), \
            rng.uniform(0.005, 0.2), rng.uniform(1e-4, 0.01)
        s = balanced_share(workers, t_pass, t_draft, t_device)
        assert 0 <= s <= 1
        if 0 < s < 1:  # workers' supply = the device's decoding
            supply = workers / ((1 - s) * t_pass + s * t_draft)
            assert supply == pytest.approx(1 / ((1 - s) * t_device), rel=1e-9)
    assert balanced_share(2, 0.01, 0.05, 0.004) == 0  # the workers barely keep up with reading files
    assert balanced_share(8, 0.001, 0.0, 0.01) == 1  # decoding costs the workers nothing


def test_error_diffusion_gives_each_run_of_photos_its_share():
    for value in (0.0, 0.3, 0.5, 1.0):
        share = DecodeShare(value)
        taken = [share.takes() for _ in range(100)]
        assert sum(taken) == round(100 * value)
        assert all(abs(sum(taken[i:i + 10]) - 10 * value) <= 1 for i in range(0, 100, 10))
    with pytest.raises(ValueError, match=r"\[0, 1\] or auto"):
        DecodeShare(1.5)


def test_auto_settles_on_the_balance_of_the_measured_costs():
    share = DecodeShare(None, workers=8)
    assert share.auto and share.value == PROBE_SHARE
    t_pass, t_draft, t_device = 0.002, 0.04, 0.003
    share.observe([t_pass] * 6, [False] * 6, None, 6)  # untimed: counted, not balanced
    assert share.value == PROBE_SHARE and share.decoded_share == 0
    for _ in range(5):
        share.observe([t_pass] * 5 + [t_draft] + [None], [False] * 5 + [True, None], 5 * t_device, 5)
    assert share.value == pytest.approx(balanced_share(WORKER_HEADROOM * 8, t_pass, t_draft, t_device))
    assert share.drafted == 5 and share.on_device == 31
    fixed = DecodeShare(0.25, workers=8)
    fixed.observe([t_pass, t_draft], [False, True], t_device, 1)
    assert fixed.value == 0.25 and fixed.decoded_share == 0.5
    assert DecodeShare(None, workers=0).value == 0  # no workers: the main process would decode alone


def _photo(seed: int) -> np.ndarray:
    y, x = np.mgrid[0:300, 0:400]
    return np.stack([(x * (seed + 1)) % 256, (y * 3) % 256, (x + y + 40 * seed) % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def big_photos(tmp_path_factory) -> Path:
    """JPEGs whose every crop decodes at 1/2 scale or less at 64 px."""
    root = tmp_path_factory.mktemp("big")
    for i in range(6):
        Image.fromarray(_photo(i)).save(root / f"photo{i}.jpg", quality=90)
    Image.fromarray(_photo(6)).save(root / "lossless.png")
    return root


class _Cfg:
    window_size, windows, mask_ratio = 4, 2, 0.75


def _base(root: Path):
    masker = get_method("lomar").masker(_Cfg(), (SIZE // 8, SIZE // 8))
    return build_pretrain_dataset(str(root), SIZE, seed=5, masker=masker)


def test_a_worker_decodes_its_share_as_draft_with_the_same_draws(big_photos):
    base = _base(big_photos)
    draft = FastPretrainDataset(base, "draft")
    mixed = EncodedPretrainDataset(base, DecodeShare(0.5))
    kinds = []
    for i in range(len(base)):
        ref, item = base[(i, 1)], mixed[(i, 1)]
        torch.testing.assert_close(item["mask"], ref["mask"], rtol=0, atol=0)
        torch.testing.assert_close(item["top_left"], ref["top_left"], rtol=0, atol=0)
        kinds.append(item.get("drafted"))
        if item.get("drafted"):  # exactly --decode draft's pixels, left uint8
            assert item["encoded"] is None and item["worker_s"] > 0 and item["image"].dtype == torch.uint8
            torch.testing.assert_close(base.transform.normalize(item["image"]), draft[(i, 1)]["image"], rtol=0,
                                       atol=0)
        elif item.get("drafted") is False:
            assert item["image"] is None and item["encoded"] is not None and item["worker_s"] > 0
    assert kinds.count(True) == 3 and kinds.count(False) == 3 and kinds.count(None) == 1  # the PNG: reference path

    batch = collate_encoded([mixed[(i, 2)] for i in range(len(base))])
    out = DeviceDecode(torch.device("cpu"), base.transform, mixed.share)(batch)
    assert out["images"].shape == (len(base), 3, SIZE, SIZE) and "drafted" not in out and "worker_s" not in out
    assert mixed.share.decoded_share == pytest.approx(0.5)
    # every row normalised once: the worker's drafts, the device's decodes and the reference path's PNG
    for row, (path, drafted) in enumerate(zip(out["paths"], batch["drafted"])):
        i = next(j for j in range(len(base)) if str(base.paths[j]) == path)
        expected = draft[(i, 2)]["image"] if drafted else base[(i, 2)]["image"]
        torch.testing.assert_close(out["images"][row], expected, rtol=0, atol=0)


def test_decode_dataset_gives_the_share_to_both_sides(big_photos):
    decoding = decode_dataset(_base(big_photos), "gpu", 8, 4, 2, cpu_share=None, workers=3)
    assert decoding.share.auto and decoding.share.workers == 3
    assert decoding.dataset.share is decoding.share is decoding.on_device.share
    assert decode_dataset(_base(big_photos), "gpu", 8, 4, 2).share.value == 0  # the default: the device alone


def test_loader_workers_read_the_share_the_main_process_sets(big_photos):
    base = _base(big_photos)
    share = DecodeShare(0.0, workers=1)
    dataset = EncodedPretrainDataset(base, share)
    loader = DataLoader(dataset, batch_size=len(base), num_workers=1, collate_fn=collate_encoded,
                        persistent_workers=True, multiprocessing_context="fork")
    first = next(iter(loader))
    share._shared.value = 1.0  # what an auto share's balance does between batches
    second = next(iter(loader))
    assert first["drafted"].count(True) == 0 and second["drafted"].count(True) == 6
