"""What a finetune says of its class folders: the start line's split counts (this process's share under torchrun),
the class-folder listing said once a machine, and a resume of a run that trained a thumbnail folder as a class."""

from __future__ import annotations

import pytest
import torch

from lomar.train import finetune as finetune_module


def test_the_start_line_counts_the_split_and_this_process_share_of_it():
    """Under torchrun the start line gives each split whole and this process's share of it, train's as val's: a
    whole split's count labelled '(this process)' would misstate it."""
    from types import SimpleNamespace

    from torch.utils.data import Subset

    from lomar.train.distributed import DistInfo
    from lomar.train.finetune import FinetuneTask

    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(embed_dim=32, depth=2)
    for world, expected in ((1, "10 training and 3 validation images, 2 classes"),
                            (2, "10 training and 3 validation images (5 and 2 this process), 2 classes")):
        stub = SimpleNamespace(model=model, classes=["a", "b"], config=SimpleNamespace(img_size=32),
                               info=DistInfo(0, world), train_loader=SimpleNamespace(dataset=range(10)),
                               val_loader=SimpleNamespace(dataset=Subset(range(3), range(0, 3, world))))
        assert FinetuneTask.describe(stub).startswith(expected)
    model.config.depth = 1  # singular: '1 block', not '1 blocks'
    assert "; ViT 32 wide, 1 block, 32 px, 0.0M params" in FinetuneTask.describe(stub)


def test_resuming_a_run_that_trained_a_thumbnail_class_says_why_it_cannot(tmp_path):
    """Runs before thumbnail caches stopped being classes hold '@eaDir' among their classes: the data did not
    change, so 'resume with the data it started with' would send the user looking for a change that is not theirs."""
    from types import SimpleNamespace

    from lomar.errors import UsageError
    from lomar.train.finetune import FinetuneTask

    stub = SimpleNamespace(classes=["cat", "dog"], config=SimpleNamespace(data=str(tmp_path), train=None, val=None))
    with pytest.raises(UsageError, match=r"^--resume: the checkpoint has a class of thumbnails \(@eaDir\), which lomar "
                                         r"now leaves out of the class folders; its scores counted them: start a new "
                                         r"run$"):
        FinetuneTask.load(stub, {"classes": ["@eaDir", "cat", "dog"]})
    with pytest.raises(UsageError, match="only in the checkpoint: \\['owl'\\]"):
        FinetuneTask.load(stub, {"classes": ["cat", "dog", "owl"]})
    FinetuneTask.load(stub, {"classes": ["cat", "dog"]})


def test_resuming_a_run_that_kept_an_empty_training_folder_as_a_class_names_the_folder_and_the_fix(tmp_path):
    """A checkpoint whose classes hold a training folder without an image (an output never trained on) meets data
    that is unchanged, read by the rule that such a folder is no class: 'resume with the data it started with'
    would send the user looking for a change that is not theirs."""
    from types import SimpleNamespace

    from lomar.errors import UsageError
    from lomar.train.finetune import FinetuneTask

    for name in ("aa", "cat", "dog", ".ipynb_checkpoints"):
        (tmp_path / "train" / name).mkdir(parents=True)
    stub = SimpleNamespace(classes=["cat", "dog"], config=SimpleNamespace(data=str(tmp_path), train=None, val=None))
    with pytest.raises(UsageError, match=f"^--resume: the checkpoint has a class whose training folder holds no image "
                                         f"\\({tmp_path / 'train' / 'aa'}\\), an output it never trained on; a class "
                                         f"folder without a training image is no class: start a new run \\(another "
                                         f"--out\\), or give the folder its training images and resume$"):
        FinetuneTask.load(stub, {"classes": ["aa", "cat", "dog"]})
    for other in (["cat", "dog", "owl"], [".ipynb_checkpoints", "cat", "dog"]):  # no folder; a folder passed over
        with pytest.raises(UsageError, match="resume with the data it started with"):
            FinetuneTask.load(stub, {"classes": other})


@pytest.mark.parametrize("local_rank, says", [("0", True), ("1", False)])
def test_under_torchrun_the_first_process_of_a_machine_alone_says_what_the_class_folders_hold(
        tmp_path, caplog, monkeypatch, local_rank, says):
    """Every process lists the class folders: torchrun --nproc-per-node 8 printed each listing warning 8 times. An
    unreadable image is still said by the process that reads it (its share), and a refused listing leaves no filter."""
    import logging

    from helpers import write_images
    from lomar.errors import UsageError
    from lomar.train.distributed import DistInfo
    from lomar.train.finetune_config import FinetuneConfig

    for split, label, count in (("train", "a", 2), ("train", "b", 2), ("val", "a", 2), ("val", "b", 1)):
        write_images(tmp_path / split / label, count, size=(36, 36))
    for split in ("train", "val"):
        write_images(tmp_path / split, 1, size=(36, 36))  # an image outside the class folders: a warning
    (tmp_path / "val" / "b" / "zz-broken.png").write_bytes(b"")  # val's 4th image: rank 1 reads it
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    config, rank = FinetuneConfig(img_size=32, batch_size=2, workers=0, aa="none"), int(local_rank)
    with caplog.at_level("WARNING", logger="lomar.data"):
        _, val, _ = finetune_module._loaders(config, tmp_path / "train", tmp_path / "val", DistInfo(rank, 2, rank))
        said = [r.getMessage() for r in caplog.records if "outside the class folders" in r.getMessage()]
        assert len(said) == (2 if says else 0), said  # train's and val's
        assert [len(batch.bad) for batch in val] == [rank]  # val 0 and 2, 1 and 3 (the broken one): one batch each
        assert ("zz-broken.png" in caplog.text) == (rank == 1)
        (tmp_path / "val" / "c").mkdir()
        write_images(tmp_path / "val" / "c", 1, size=(36, 36))
        with pytest.raises(UsageError, match="class folders differ"):
            finetune_module._loaders(config, tmp_path / "train", tmp_path / "val", DistInfo(rank, 2, rank))
    assert not logging.getLogger("lomar.data").filters  # the next warning is said again
