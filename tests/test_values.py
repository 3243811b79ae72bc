"""lomar.values: what counts as an image size, the one rule ViTConfig, grid_size and the checkpoint readers share."""

import numpy as np
import pytest

from lomar.values import as_sides, is_size


@pytest.mark.parametrize("size, sides", [(224, (224, 224)), ((224, 320), (224, 320)), ([224, 320], (224, 320)),
                                         (np.int64(224), (224, 224)), ((np.int32(32), 64), (32, 64))])
def test_a_size_is_an_integer_or_a_pair_of_them(size, sides):
    assert is_size(size) and as_sides(size) == sides
    assert all(type(side) is int for side in as_sides(size))  # numpy's would reach config.json and fail there


@pytest.mark.parametrize("size", [True, 224.0, "224", "ab", (224,), (3, 224, 224), (224, 320.0), (True, 2), None,
                                  np.array([224, 224])])
def test_anything_else_is_refused_by_name(size):
    assert not is_size(size)
    with pytest.raises(ValueError, match=r"^input_size must be an integer or a \(height, width\) pair of integers, "
                                         r"got .+; pass e\.g\. 224 or \(224, 320\)$") as info:
        as_sides(size, "input_size")
    assert repr(size)[:8] in str(info.value)
