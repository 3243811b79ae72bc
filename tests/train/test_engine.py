"""The pretraining engine's runs: checkpoints (weights-only contents, pruning, a failed save), a non-finite loss,
bad files skipped and counted, MAE, the reconstruction figures, and k-NN monitoring. Tiny models on tiny images,
CPU, in-process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import losses, pretrain, write_images
from lomar.checkpoints.io import safe_load
from lomar.models.lomar import LoMaR
from lomar.models.mae import MAE
from lomar.models.vit import model_config
from lomar.train.run_state import checkpoints_to_prune


def test_checkpoint_contents_load_weights_only(tmp_path, image_dir):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "1") == 0
    ckpt = safe_load(out / "last.pt")  # weights_only=True: nothing but tensors and plain data
    assert {"model", "optimizer", "scaler", "step", "epoch", "batches_done", "config", "rng"} <= set(ckpt)
    assert ckpt["config"]["window_size"] == 3 and isinstance(ckpt["config"], dict)
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"])
    assert (out / "encoder.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "reconstruction.png").stat().st_size > 1000
    assert list(out.glob("checkpoint-*.pt"))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "epoch", "loss", "lr", "img_s"} <= set(record)


def test_keep_last_prunes_old_checkpoints(tmp_path, image_dir, no_run_figures):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--epochs", "3", "--save-every", "1",
                    "--keep-last", "2") == 0
    assert len(list(out.glob("checkpoint-*.pt"))) == 2


def test_pruning_goes_by_step_number_and_spares_other_files():
    names = ["checkpoint-999998.pt", "checkpoint-999999.pt", "checkpoint-1000000.pt", "checkpoint-best.pt"]
    pruned = checkpoints_to_prune([Path(n) for n in names], keep=2)
    assert [p.name for p in pruned] == ["checkpoint-999998.pt"]


def test_failed_save_leaves_the_previous_last_pt_intact(tmp_path, image_dir, monkeypatch):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "2") == 0
    before = (out / "last.pt").read_bytes()

    def dying_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr("lomar.checkpoints.io.torch.save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "3", "--resume", "auto")
    assert (out / "last.pt").read_bytes() == before
    assert safe_load(out / "last.pt")["step"] == 2
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_non_finite_loss_stops_with_the_step_and_keeps_last_checkpoint(tmp_path, image_dir, monkeypatch,
                                                                        capsys):
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "2") == 0
    capsys.readouterr()
    real = LoMaR.forward_windows

    def exploding(self, *args):
        loss, pred = real(self, *args)
        return loss * float("nan"), pred

    monkeypatch.setattr(LoMaR, "forward_windows", exploding)
    code = pretrain("--data", str(image_dir), "--out", str(out), "--max-steps", "4", "--resume", "auto")
    err = capsys.readouterr().err
    assert code == 1
    assert "step 3" in err and "nan" in err and "last.pt" in err
    assert safe_load(out / "last.pt")["step"] == 2


def test_bad_files_are_skipped_and_counted(tmp_path, capsys):
    data = write_images(tmp_path / "data", 20)
    (data / "empty.png").write_bytes(b"")
    (data / "garbage.jpg").write_bytes(b"not an image at all")
    assert pretrain("--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1") == 0
    out = capsys.readouterr().out
    assert "2 unusable image(s) skipped, e.g. " in out
    assert f"{data / 'empty.png'} (the file is empty (0 bytes))" in out


def test_too_many_bad_files_is_a_clear_error(tmp_path, capsys):
    data = write_images(tmp_path / "data", 16)
    for i in range(8):
        (data / f"broken{i}.png").write_bytes(b"\x89PNG truncated")
    code = pretrain("--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "2")
    err = capsys.readouterr().err
    assert code == 1
    assert "could not be used" in err and "broken" in err


def test_mae_method_trains(tmp_path, image_dir):
    out = tmp_path / "mae"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--method", "mae", "--decoder-embed-dim", "16",
                    "--decoder-depth", "1", "--decoder-num-heads", "2", "--max-steps", "2", "--windows", "0") == 0
    assert all(math.isfinite(v) for v in losses(out))
    assert (out / "reconstruction.png").is_file()


@pytest.mark.parametrize("method", ["lomar", "mae"])
def test_reconstruction_figure_is_written(tmp_path, method):
    from lomar.viz.reconstruction import reconstruct, reconstruction_figure

    if method == "lomar":
        model = LoMaR(model_config("vit_tiny_patch8", depth=1, img_size=48), 3, 2)
    else:
        model = MAE(model_config("vit_tiny_patch8", depth=1, img_size=48, pos="abs"), 16, 1, 2)
    images = torch.randn(2, 3, 48, 48)
    parts = reconstruct(model, images, seed=0)
    for key in ("original", "masked", "reconstruction"):
        assert parts[key].shape == images.shape
        assert 0 <= float(parts[key].min()) and float(parts[key].max()) <= 1
    path = reconstruction_figure(model, images, tmp_path / "fig.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_reconstruction_figure_uses_a_given_plan(tmp_path):
    from lomar.models.masking import sample_plan
    from lomar.viz.reconstruction import reconstruct, reconstruction_figure

    model = LoMaR(model_config("vit_tiny_patch8", depth=1, img_size=48), 3, 2)
    images = torch.randn(2, 3, 48, 48)
    plan = sample_plan(2, (6, 6), 3, 2, 0.8, generator=torch.Generator().manual_seed(7))
    parts = reconstruct(model, images, seed=123, plan=plan)
    assert torch.equal(parts["plan"].top_left, plan.top_left) and torch.equal(parts["plan"].mask, plan.mask)
    assert reconstruction_figure(model, images, tmp_path / "fig.png", plan=plan).is_file()


def test_an_accumulation_window_without_readable_images_is_skipped(tmp_path, image_dir, monkeypatch, capsys):
    import lomar.data.collate
    from lomar.data.collate import BadDataTracker, collate_pretrain

    calls = []

    def collate_some_unreadable(items):  # the 3rd and 4th batches (the 2nd optimizer step) fail to decode
        calls.append(1)
        if len(calls) in (3, 4):
            items = [dict(item, image=None) for item in items]
        return collate_pretrain(items)

    monkeypatch.setattr(lomar.data.collate, "collate_pretrain", collate_some_unreadable)  # what --decode full uses
    monkeypatch.setattr(BadDataTracker, "check", lambda self, threshold=0.1: None)  # 50 % bad is the point
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--epochs", "1", "--accum-steps", "2") == 0
    assert len(losses(out)) == 1 and math.isfinite(losses(out)[0])  # one real step, the empty one skipped
    assert "8 unusable image(s) skipped" in capsys.readouterr().out


def test_knn_every_epoch(tmp_path, image_dir, capsys, no_run_figures):
    root = tmp_path / "knn"
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(root / split / label, 3, size=(32, 32))
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--knn-every", "1", "--knn-data", str(root)) == 0
    records = [json.loads(line) for line in (out / "knn.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(0 <= r["knn_top1"] <= 1 for r in records)
    assert "k-NN top-1" in capsys.readouterr().out
    assert pretrain("--data", str(image_dir), "--out", str(tmp_path / "r2"), "--knn-every", "1") == 2
    assert "--knn-data" in capsys.readouterr().err
    # the reverse: a k-NN set with no schedule would be read by nothing; a resumed run keeps what it saved
    assert pretrain("--data", str(image_dir), "--out", str(tmp_path / "r3"), "--knn-data", str(root)) == 2
    assert capsys.readouterr().err.strip().endswith("--knn-data is used only with --knn-every N (a k-NN evaluation "
                                                    "every N epochs); add --knn-every 1, or drop --knn-data")
    assert not (tmp_path / "r3").exists()


def test_the_knn_loader_workers_leave_a_group_sigterm_to_the_run(tmp_path, image_dir, monkeypatch, no_run_figures):
    """A scheduler's SIGTERM reaches every process of the group, the k-NN scoring's loader workers too: they
    leave it to the run (which checkpoints at its next step) instead of dying of it, which failed the run."""
    import os
    import signal

    from torch.utils.data import get_worker_info

    import lomar.eval.features as features

    root = tmp_path / "knn"
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(root / split / label, 3, size=(32, 32))
    item = features.LabelledImageFolder.__getitem__

    def signalled(self, index):  # in a worker, as a signal to the process group reaches it
        if get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGTERM)
        return item(self, index)

    monkeypatch.setattr(features.LabelledImageFolder, "__getitem__", signalled)
    out = tmp_path / "run"
    assert pretrain("--data", str(image_dir), "--out", str(out), "--knn-every", "1", "--knn-data", str(root),
                    "--workers", "1", "--epochs", "1") == 0
    assert [json.loads(line)["epoch"] for line in (out / "knn.jsonl").read_text().splitlines()] == [1]
