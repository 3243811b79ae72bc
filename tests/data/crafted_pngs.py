"""A small random PNG written to a given path, for the decode and folder tests."""

import numpy as np
from PIL import Image


def _png(path, size=(20, 30), seed=0):
    Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)).save(path)
    return path
