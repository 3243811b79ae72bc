"""Class-folder datasets on odd but legal data: what is the file's fault and what is not."""

import numpy as np
import pytest
from PIL import Image

from lomar.data.folder import LabelledImageFolder


def _folder(root):
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(root / label / "0.png")
    (root / "dog" / "broken.png").write_bytes(b"garbage")
    return root


def test_a_failing_transform_is_raised_not_counted_as_an_unreadable_image(tmp_path):
    """A readable image whose augmentation fails is a bug, not a bad file: counted as unreadable, a RandAugment op
    failing now and then blamed as many files and stopped long runs with 'fix or remove them'."""
    def failing(image):
        raise ValueError("bits must be between or equal to 1 and 8")

    dataset = LabelledImageFolder(_folder(tmp_path), failing)
    with pytest.raises(ValueError, match="bits must be"):
        dataset[0]
    image, label, path = dataset[2]  # an unreadable file is still skipped, not raised
    assert image is None and path.endswith("broken.png") and label == 1
