"""The default finetune augmentation at realistic volume (it once crashed ~1 call in 750)."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from lomar.data.classify import _posterize_any_bits, classification_transforms


def test_posterize_zero_bits_is_black_image():
    img = Image.fromarray(np.full((4, 5, 3), 200, np.uint8))
    out = _posterize_any_bits(img, 0)
    assert out.size == img.size and out.mode == "RGB"
    assert np.asarray(out).max() == 0
    assert np.array_equal(np.asarray(_posterize_any_bits(img, 4)), np.full((4, 5, 3), 192, np.uint8))
    assert _posterize_any_bits(img, 8) is img


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "rand-m10-mstd1-inc1", "rand-m9-mstd0.5"])
def test_default_train_transform_survives_thousands_of_calls(aa):
    train_tf, val_tf = classification_transforms(16, aa=aa)
    random.seed(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(8)]
    for i in range(3000):
        x = train_tf(images[i % len(images)])
        assert x.shape == (3, 16, 16)
    assert val_tf(images[0]).shape == (3, 16, 16)


def test_posterize_zero_bits_is_actually_drawn():
    """The guard is exercised: with the default policy, 0-bit posterize happens in 3,000 calls."""
    from timm.data.auto_augment import AugmentOp

    train_tf, _ = classification_transforms(16)
    ops = [op for t in train_tf.transforms for op in getattr(t, "ops", ()) if isinstance(op, AugmentOp)]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize and all(op.aug_fn is _posterize_any_bits for op in posterize)
    random.seed(1)
    levels = [op.level_fn(max(0.0, min(random.gauss(op.magnitude, op.magnitude_std), 10)), op.hparams)[0]
              for op in posterize for _ in range(3000)]
    assert min(levels) == 0


@pytest.mark.parametrize("aa", ["v0", "original", "originalr", "v0r", "3a", "augmix-m5", "rand-m0"])
def test_every_policy_kind_has_its_posterize_guarded(aa):
    """AutoAugment (--aa original, v0, ...) keeps its ops in sub-policies, not in ``ops``: found too."""
    from lomar.data.classify import _augment_ops

    ops = _augment_ops(classification_transforms(16, aa=aa)[0])
    assert ops
    assert all(op.aug_fn is _posterize_any_bits for op in ops if op.name.startswith("Posterize"))


def test_autoaugment_v0_survives_thousands_of_calls():
    """v0's sub-policy ('Posterize', 0.8, 2) asks Pillow for 0 bits: about 1 call in 37 raised ValueError, which
    a finetuning run counted as an unreadable image."""
    train_tf, _ = classification_transforms(16, aa="v0")
    random.seed(0)
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    for _ in range(1000):
        assert train_tf(image).shape == (3, 16, 16)


@pytest.mark.parametrize("aa, section", [("rand-m9-mstd0.5-incl", "'incl' holds no number"),
                                         ("augmix-m5-x", "'x' holds no number"), ("original-x", "'x' holds no"),
                                         ("rand-m9-tbogus", "'tbogus' names no RandAugment op set")])
def test_an_aa_section_timm_would_pass_over_is_refused(capsys, aa, section):
    """timm skips a section without a digit (and takes its default op set for an unknown 't' one) without a word:
    'incl' for 'inc1' trained the non-increasing ops."""
    from lomar.cli.app import main

    assert main(["finetune", "--aa", aa, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"--aa {aa!r}: section {section}" in err and err.count("\n") == 1
    for good in ("rand-m9-mstd0.5-inc1", "rand-m9-t3a", "augmix-m9-mstd0.5-w5-d2", "original-mstd0.5", "3a", "none"):
        assert main(["finetune", "--aa", good, "--print-config"]) == 0
    capsys.readouterr()
