"""Every decode mode at volume, over awkward JPEGs (tiny, extreme aspect ratios, sizes around the
crop's reduction thresholds, progressive, greyscale, 4:4:4, EXIF-rotated): no sample may be lost
(the fast paths turn a decoding error into an "unreadable image"), and each agrees with the
reference path. A default that fails one call in a thousand does not show on one call."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lomar.data.device_decode import EncodedPretrainDataset, collate_encoded, decode_batch
from lomar.data.fast_decode import FastPretrainDataset
from lomar.data.folder import build_pretrain_dataset
from lomar.methods import get_method

SIZE, EPOCHS = 64, 100  # 64 px crops: reduced decoding starts at 128 px crops, 1/8 at 512 px
SIDES = [(64, 64), (65, 300), (127, 129), (128, 128), (129, 257), (300, 17), (17, 300), (333, 515),
         (97, 1024), (1024, 97), (701, 999), (1200, 900), (257, 255), (511, 513), (480, 640), (1030, 1030)]


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("awkward")
    for i, (h, w) in enumerate(SIDES):
        y, x = np.mgrid[0:h, 0:w]
        image = Image.fromarray(np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2 + 40 * i) % 256], -1)
                                .astype(np.uint8))
        options = [dict(quality=90), dict(quality=85, progressive=True), dict(quality=90),
                   dict(quality=95, subsampling=0)][i % 4]
        if i % 4 == 2:
            image = image.convert("L")
        if i % 5 == 4:
            exif = Image.Exif()
            exif[0x0112] = 6  # rotate 90° on display: the fast paths must hand it to the reference
            options["exif"] = exif
        image.save(root / f"photo{i:02d}.jpg", **options)
    return root


class _Cfg:  # the settings the LoMaR masker reads
    window_size, windows, mask_ratio = 4, 2, 0.75


def _base(root: Path):
    masker = get_method("lomar").masker(_Cfg(), (SIZE // 8, SIZE // 8))
    return build_pretrain_dataset(str(root), SIZE, seed=3, masker=masker)


def _keys(base) -> list[tuple[int, int]]:
    return [(i, epoch) for epoch in range(EPOCHS) for i in range(len(base))]


@pytest.mark.parametrize("mode", ["draft", "windows"])
def test_reduced_decoding_loses_no_sample_and_matches_the_reference(awkward, mode):
    base = _base(awkward)
    fast = FastPretrainDataset(base, mode, patch_size=8, window_size=_Cfg.window_size, num_windows=_Cfg.windows)
    worst = 0.0
    for key in _keys(base):
        item, ref = fast[key], base[key]
        assert item["image"] is not None, f"{mode} lost {item['path']} at {key}"
        assert item["image"].shape == (3, SIZE, SIZE) and torch.isfinite(item["image"]).all()
        torch.testing.assert_close(item["top_left"], ref["top_left"], rtol=0, atol=0)
        torch.testing.assert_close(item["mask"], ref["mask"], rtol=0, atol=0)
        if mode == "draft":  # the same crop, decoded smaller: close, not equal (a wrong box is ~0.5)
            worst = max(worst, float((item["image"] - ref["image"]).abs().mean()))
    assert worst < 0.25, f"draft decoding drifted from the reference crop: mean |diff| {worst:.3f}"


def test_batched_device_decoding_on_cpu_loses_no_sample_and_equals_the_reference(awkward):
    base = _base(awkward)
    encoded = EncodedPretrainDataset(base)
    keys = _keys(base)
    for start in range(0, len(keys), 32):
        batch_keys = keys[start:start + 32]
        batch = decode_batch(collate_encoded([encoded[k] for k in batch_keys]), torch.device("cpu"), base.transform)
        assert batch["bad"] == [], batch["bad"]
        torch.testing.assert_close(batch["images"], torch.stack([base[k]["image"] for k in batch_keys]),
                                   rtol=0, atol=0)
