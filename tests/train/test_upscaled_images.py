"""Images smaller than the training crop, whose every crop is upscaled: each counted once over the whole run (a resume,
loader workers, every process) and said in the run's last line, the first one met warned of at once."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from toy_run import ToyConfig, ToyTask

from helpers import pretrain, write_images
from lomar.checkpoints.file_names import KNN_LOG
from lomar.checkpoints.io import safe_load
from lomar.train.distributed import DistInfo
from lomar.train.lifecycle import run
from lomar.train.upscaled_files import UpscaledFiles


def test_a_pretraining_counts_each_image_smaller_than_its_crop_once_over_a_resume_and_loader_workers(tmp_path,
                                                                                                      capsys):
    data = write_images(tmp_path / "data", 6)  # 40x48: over the 32 px crop
    for name, (height, width) in (("small-a.png", (20, 16)), ("small-b.png", (30, 24))):
        Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(data / name)
    out = tmp_path / "run"
    line = f"2 images smaller than the 32 px crop upscaled, the smallest 16x20 ({data / 'small-a.png'})"
    # 8 images in batches of 4: an epoch is 2 steps, each file read once in it
    assert pretrain("--data", str(data), "--out", str(out), "--max-steps", "2") == 0
    said = capsys.readouterr()
    assert f"; {line}" in said.out.rstrip().splitlines()[-1]
    assert said.err.count("smaller than the 32 px crop: upscaled") == 1  # the first met, at once
    assert safe_load(out / "last.pt")["upscaled"]["smallest"] == [20, 16, str(data / "small-a.png")]
    # a second epoch reads them again, in two loader workers: still two files
    assert pretrain("--data", str(data), "--out", str(out), "--max-steps", "4", "--resume", "auto",
                    "--workers", "2") == 0
    assert f"; {line}" in capsys.readouterr().out.rstrip().splitlines()[-1]


class Cropped(ToyTask):
    crop_size = 32

    def sources(self, batch):
        return [("a.png", 20, 30), ("big.png", 32, 40)]


def _two_ranks(monkeypatch, other: list[tuple[str, int, int]]) -> None:
    """A gather under DDP of two processes, the second having read ``other`` (a collective: here, made up)."""
    second = UpscaledFiles(32)
    second.count(other)
    mine = {"keys": torch.tensor(sorted(second.keys), dtype=torch.int64), "smallest": second.smallest}
    monkeypatch.setattr(dist, "all_gather_object", lambda ranks, obj: ranks.__setitem__(slice(None), [obj, mine]))


def test_the_last_line_counts_what_every_rank_upscaled(tmp_path, capsys, monkeypatch):
    """Rank 0's last line counts every rank's files, a file two ranks read once, and names the smallest of all."""
    _two_ranks(monkeypatch, [("a.png", 20, 30), ("b.png", 10, 12)])
    real = UpscaledFiles.gathered
    monkeypatch.setattr(UpscaledFiles, "gathered", lambda self, info: real(self, DistInfo(0, 2)))
    assert run(ToyConfig(out=str(tmp_path), epochs=1), Cropped) == 0
    done = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert done.endswith(", 2 images smaller than the 32 px crop upscaled, the smallest 12x10 (b.png)")


def test_a_checkpoint_holds_each_upscaled_file_once_however_many_processes_read_it(monkeypatch):
    """Over a long run every process reads most files: a checkpoint holding each process's would grow with their
    count (and a list of ints is slow to save and load: tens of seconds at ImageNet's size)."""
    _two_ranks(monkeypatch, [("a.png", 20, 30), ("b.png", 10, 12)])
    first = UpscaledFiles(32)
    first.count([("a.png", 20, 30), ("c.png", 8, 30)])
    saved = first.gathered(DistInfo(0, 2))
    assert isinstance(saved["keys"], torch.Tensor) and len(saved["keys"]) == 3 and saved["smallest"] == [8, 30, "c.png"]
    first.count([("a.png", 20, 30)])  # read again in the next epoch: no second entry
    assert len(first.gathered(DistInfo())["keys"]) == 3


def test_a_resume_on_another_count_of_processes_goes_on_from_every_ranks_files():
    """Every process takes the checkpoint's files: the run's count loses none and counts none twice, whatever the new
    count of processes."""
    a = UpscaledFiles(32)
    a.count([("a.png", 20, 30), ("b.png", 10, 12)])
    saved = a.gathered(DistInfo())
    first, second = UpscaledFiles(32, say=True), UpscaledFiles(32)
    first.restore(saved)
    second.restore(saved)
    first.count([("a.png", 20, 30), ("c.png", 12, 12)])
    assert first.warned and first.summary(first.gathered(DistInfo())) == (
        "3 images smaller than the 32 px crop upscaled, the smallest 12x10 (b.png)")
    assert second.summary(second.gathered(DistInfo())).startswith("2 images")
    assert second.summary(None) == ""


def test_a_finetuning_counts_its_training_images_smaller_than_its_crop_and_its_val_images_under_the_resize(
        tmp_path, capsys, pretrained):
    """A copy that refills a batch's unreadable place is no second image read; val's images are not counted in the
    crop's line: those under the 36 px resize are said once, as knn and linprobe say them, however many evaluations."""
    from finetune_cli import _finetune

    for split, count in (("train", 3), ("val", 1)):
        for label in ("a", "b"):
            write_images(tmp_path / "data" / split / label, count, size=(36, 36))
    small, tiny = tmp_path / "data" / "train" / "a" / "small.png", tmp_path / "data" / "val" / "a" / "tiny.png"
    Image.fromarray(np.full((20, 16, 3), 90, np.uint8)).save(small)
    Image.fromarray(np.full((8, 10, 3), 90, np.uint8)).save(tiny)
    assert _finetune(pretrained, tmp_path / "data", tmp_path / "ft", "--epochs", "2", "--batch-size", "4") == 0
    said = capsys.readouterr()
    assert f"1 image smaller than the 32 px crop upscaled, the smallest 16x20 ({small})" in said.out.splitlines()[-1]
    assert said.err.count(f"lomar finetune: note: {tiny.parents[1]}: 1 image smaller than the 36 px resize "
                          f"upscaled, the smallest 10x8 ({tiny})\n") == 1


def test_a_finetunings_val_note_counts_every_ranks_images(tmp_path, monkeypatch, capsys):
    """Under DDP each process evaluates its slice of val: the main one says every process's count."""
    from lomar.data.collate import collate_labelled
    from lomar.data.folder import LabelledImageFolder
    from lomar.train.finetune import FinetuneTask

    for label in ("a", "b"):
        write_images(tmp_path / label, 1, size=(36, 36))
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "a" / "mine.png")
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: None)
    other = ([], (2, (10, 12, "b.png")))  # the second process: two under the resize, the smallest 12x10
    monkeypatch.setattr(dist, "gather_object", lambda obj, gathered, dst: gathered.__setitem__(slice(None),
                                                                                                [obj, other]))
    val = LabelledImageFolder(tmp_path, lambda image: torch.zeros(3, 4, 4))
    task = FinetuneTask.__new__(FinetuneTask)  # its evaluation alone: a stand-in classifier
    task.model, task.device, task.info, task.config = torch.nn.Flatten(), torch.device("cpu"), DistInfo(0, 2), None
    task.val_resize, task.small_counted, task.classes, task.train_loader = 36, False, ["a", "b"], None
    task.val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val, range(3)), 3,
                                                  collate_fn=collate_labelled)
    task.autocast = contextlib.nullcontext
    task.evaluate()
    task.evaluate()  # the same images: said once
    assert capsys.readouterr().err.count(f"lomar finetune: note: {tmp_path}: 3 images smaller than the 36 px resize "
                                         f"upscaled, the smallest 12x10 (b.png)\n") == 1


def test_pretrain_knn_every_says_its_images_under_the_resize_once(tmp_path, capsys, image_dir):
    """--knn-every's k-NN resizes --knn-data's images to 36 px (32 px crops), as knn does: those under it are said as
    knn says them, once however many scorings (every process's counted: lomar.eval.knn_shared joins them)."""
    root = tmp_path / "knn"
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(root / split / label, 1)  # 40x48
    tiny = root / "val" / "b" / "tiny.png"
    Image.fromarray(np.full((12, 20, 3), 90, np.uint8)).save(tiny)
    # 16 images in batches of 4: scored after the first epoch and at the end
    assert pretrain("--data", str(image_dir), "--out", str(tmp_path / "run"), "--knn-every", "1", "--knn-data",
                    str(root), "--max-steps", "5") == 0
    said = capsys.readouterr()
    assert len((tmp_path / "run" / KNN_LOG).read_text().splitlines()) == 2
    assert said.err.count(f"lomar pretrain: note: --knn-data {root / 'val'}: 1 image smaller than the 36 px resize "
                          f"upscaled, the smallest 20x12 ({tiny})\n") == 1
    assert f"{root / 'train'}:" not in said.err
