import os
from pathlib import Path

import pytest
import torch

from helpers import CPU_RUN, first_image_split, one_step_run, write_images
from lomar.cli.app import main

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``longest`` run first. ``make test``'s ``-n 2 --dist worksteal`` deals tests out in this order:
    a long test collected late could start near the end, one worker waiting alone on it."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _isolated_working_directory(tmp_path_factory, monkeypatch):
    """Every test runs in an empty folder of its own: what a command writes by default (``runs/``)
    lands there, and nothing the demo or a user left in the repository can change a result."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session", autouse=True)
def _private_cache_folder(tmp_path_factory):
    """What lomar keeps between runs (``lomar.data.user_cache.cache_folder``: coco_shared's packed COCO splits,
    pair_checks' checked segmentation pairs) goes to a folder of the session's, never to the user's ``~/.cache/lomar``;
    session-wide, so that session fixtures' runs write there too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOMAR_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """16 small random PNGs (40x48) in one folder."""
    return write_images(tmp_path_factory.mktemp("images"), 16)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """``last.pt`` of a 1-step tiny LoMaR run (helpers.TINY) on 16 random images of its own, as ``image_dir``'s.
    Built once a session: a build is ~2.8 s of a loaded 2-core host, and 18 modules take it (7 in tests/train). Its
    tests only read it and its run folder; one that changes either works on a copy."""
    return one_step_run(tmp_path_factory.mktemp("pre"), write_images(tmp_path_factory.mktemp("pre_images"), 16))


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory) -> Path:
    """An ImageFolder root: train/ (4 per class) and val/ (2 per class) of two classes, 36 px."""
    root = tmp_path_factory.mktemp("cls")
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            write_images(root / split / label, count, size=(36, 36))
    return root


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, pretrained, labelled_folder) -> Path:
    """A `lomar finetune` run folder (one epoch, fp32, 32 px) of the two classes of ``labelled_folder``."""
    run = tmp_path_factory.mktemp("ft") / "run"
    assert main(["finetune", "--pretrained", str(pretrained), "--data", str(labelled_folder), "--img-size", "32",
                 "--out", str(run), "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "none", "--epochs", "1",
                 "--batch-size", "4", "--precision", "fp32", *CPU_RUN]) == 0
    return run


@pytest.fixture(scope="session")
def digits64(tmp_path_factory) -> Path:
    """A compose-digits root (COCO and ADE20K layouts) of 8 images of 64 px: 6 training, 2 validation."""
    from lomar.data.compose import compose_digits

    root = tmp_path_factory.mktemp("digits64") / "set"
    compose_digits(root, img_size=64, images=8, seed=0, digit_scale=(0.3, 0.5))
    return root


@pytest.fixture(scope="session")
def dense_runs(tmp_path_factory, digits64) -> tuple[Path, Path, Path, Path]:
    """(``digits64``, its first validation image's COCO split, a `lomar detect` run folder, a `lomar segment` run
    folder): a tiny ViT's detector and segmenter trained one epoch of 3 steps (best.pt and last.pt), the detector's
    evaluations on that one image, at 10 region proposals (tests/train/conftest.py's ``eval_proposals``): no test reads
    their scores, and its one evaluation picks the same best.pt at any count."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    root, data = tmp_path_factory.mktemp("dense"), digits64
    one_val = first_image_split(data / "annotations" / "instances_val.json", root / "one_val.json")
    tiny = ["--model", "vit_tiny_patch16", "--img-size", "64", "--batch-size", "2", "--max-steps", "3",
            "--warmup-steps", "1", *CPU_RUN]
    own = RegionProposalNetwork.post_nms_top_n
    with pytest.MonkeyPatch.context() as patch:  # session-wide: undone before any test runs the detector
        patch.setattr(RegionProposalNetwork, "post_nms_top_n", lambda self: own(self) if self.training else 10)
        assert main(["detect", "--train-ann", str(data / "annotations" / "instances_train.json"), "--train-images",
                     str(data / "images" / "train"), "--val-ann", str(one_val), "--val-images",
                     str(data / "images" / "val"), *tiny, "--rois-per-image", "32", "--out", str(root / "det")]) == 0
    assert main(["segment", "--data", str(data), "--num-classes", "10", "--head-channels", "16", *tiny,
                 "--out", str(root / "seg")]) == 0
    return data, one_val, root / "det", root / "seg"


@pytest.fixture
def no_run_figures(monkeypatch):
    """A pretraining run's reconstruction figure and loss curve not drawn (PretrainTask.figure), for tests that read
    neither (a study's cells, a refusal, a warning, a recorded setting): matplotlib is most of a tiny run's time (~1 s
    of each start and save on 2 cores), and a time budget's cell saves after every slice. A figure that fails only
    prints; tests/train/test_run_figures.py and tests/viz check them. tests/train/test_engine_resume.py's resumes of
    an image folder and of tar shards draw theirs: a figure reads training images, from a shard's stream too."""
    monkeypatch.setattr("lomar.train.pretrain.PretrainTask.figure", lambda self, model=None: None)
