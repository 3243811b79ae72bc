import pytest
from coco_tiny import write_tiny_coco


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(train, val) of :func:`coco_tiny.write_tiny_coco`: 6 training and 3 validation images, each (annotation file,
    image folder)."""
    root = tmp_path_factory.mktemp("coco")
    return write_tiny_coco(root / "train", 6, seed=0), write_tiny_coco(root / "val", 3, seed=1)


@pytest.fixture(scope="module")
def one_val(tmp_path_factory):
    """A validation split of one image: for runs whose evaluations are not what the test checks (a randomly
    initialised detector's mask head runs on 100 boxes an image)."""
    return write_tiny_coco(tmp_path_factory.mktemp("coco") / "val", 1, seed=1)
