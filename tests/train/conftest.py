from pathlib import Path

import pytest
from coco_tiny import write_tiny_coco

from lomar.data.compose import compose_digits


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


@pytest.fixture
def eval_proposals(monkeypatch):
    """``keep(count)``: evaluations keep ``count`` region proposals an image, not the detector's 1000; training's are
    left as they are. A detector's box head convolves every proposal (~4 s of a 2-core CPU an evaluation of one 64 px
    image at 1000, a randomly initialised detector's mask head on up to 100 detections included)."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    own = RegionProposalNetwork.post_nms_top_n

    def keep(count: int) -> None:
        monkeypatch.setattr(RegionProposalNetwork, "post_nms_top_n", lambda self: own(self) if self.training else count)

    return keep


@pytest.fixture
def few_eval_proposals(eval_proposals):
    """Evaluations keep 10 region proposals an image (:func:`eval_proposals`): for runs whose scores are not what the
    test checks."""
    eval_proposals(10)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "set"
    compose_digits(root, img_size=32, images=10, seed=0, digit_scale=(0.3, 0.5))
    return root


@pytest.fixture(scope="module")
def folder(labelled_folder) -> Path:
    """tests/conftest.py's labelled_folder, under the name the finetune tests take it by."""
    return labelled_folder

