"""The evaluation transforms on strips: a tiny file must not become gigabytes before its centre crop."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from lomar.cli import visualize
from lomar.data.classify import MAX_ASPECT, bound_aspect, classification_transforms
from lomar.eval.features import eval_transform


def test_bound_aspect_keeps_the_centre_of_a_strip_and_leaves_other_images_alone():
    image = torch.arange(2 * 100).reshape(1, 2, 100)
    assert torch.equal(bound_aspect(image), image[:, :, 34:66])
    assert bound_aspect(Image.new("RGB", (5, 300))).size == (5, 5 * MAX_ASPECT)
    square = Image.new("RGB", (MAX_ASPECT * 3, 3))
    assert bound_aspect(square) is square


def _resized_sizes(transform):
    """Wrap the transform's centre crop so that it records the size of the resized image it is given."""
    sizes = []
    index = next(i for i, t in enumerate(transform.transforms) if type(t).__name__ == "CenterCrop")
    crop = transform.transforms[index]
    transform.transforms[index] = lambda image: (sizes.append(TF.get_size(image)), crop(image))[1]
    return sizes


@pytest.mark.parametrize("make", [lambda: classification_transforms(16)[1], lambda: eval_transform(16)],
                         ids=["finetune-eval", "features"])
def test_a_strip_is_not_resized_whole(make):
    transform = make()
    sizes = _resized_sizes(transform)
    strip = Image.fromarray(np.full((1, 20000, 3), 90, np.uint8))  # whole: resized to 18 x 360,000
    assert transform(strip).shape == (3, 16, 16)
    (height, width), = sizes
    assert width <= MAX_ASPECT * height


@pytest.mark.parametrize("size", [32, 160, 224, 256, 384])
def test_knn_and_linprobe_evaluate_each_size_as_finetune_does(size):
    # features cropped 0.875 at every size (and rounded the resize): at 256 px they saw 256 of 293 px, finetune the
    # whole 256, and at 160 px a 183 px resize against finetune's 182
    image = Image.new("RGB", (3 * size // 2, 2 * size))
    seen = []
    for transform in (classification_transforms(size)[1], eval_transform(size)):
        sizes = _resized_sizes(transform)
        assert transform(image).shape == (3, size, size)
        seen.append(sizes[0])
    assert seen[0] == seen[1]


def test_visualize_resizes_a_strip_after_cutting_it(tmp_path, monkeypatch):
    Image.fromarray(np.full((20000, 2, 3), 90, np.uint8)).save(tmp_path / "strip.png")
    sizes, resize = [], TF.resize

    def recording(image, *args, **kwargs):
        sizes.append(TF.get_size(image))
        return resize(image, *args, **kwargs)

    monkeypatch.setattr(TF, "resize", recording)
    assert visualize.prepare_image(tmp_path / "strip.png", 16).shape == (3, 16, 16)
    assert sizes == [[2 * MAX_ASPECT, 2]]
