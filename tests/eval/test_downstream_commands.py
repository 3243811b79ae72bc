"""A tiny LoMaR pretraining checkpoint (the ``pretrained`` fixture) taken downstream on red-vs-blue folders: loaded
from each of its forms, `lomar knn` / `lomar linprobe` runs and their refusals, and `lomar finetune` runs (resume,
unreadable images, top-1/top-5 counts, torchrun, SIGUSR1)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from downstream_models import _checkpoint
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from lomar import export_encoder
from lomar.checkpoints.io import safe_load
from lomar.checkpoints.keys import lomar_to_original
from lomar.cli.app import main
from lomar.eval import knn
from lomar.eval.features import load_pretrained_encoder
from lomar.train import finetune


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("pre") / "last.pt", "lomar")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """ImageFolder train/ (6 per class) and val/ (3 per class): red vs blue noisy squares."""
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for label, colour in ((0, (200, 30, 30)), (1, (30, 30, 200))):
            d = root / split / f"class{label}"
            d.mkdir(parents=True)
            for i in range(count):
                img = np.clip(np.array(colour) + rng.normal(0, 20, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_load_pretrained_encoder_from_each_source(pretrained, tmp_path):
    ours = load_pretrained_encoder(pretrained)
    model_state = safe_load(pretrained)["model"]
    assert torch.equal(ours.blocks[0].attn.rpe.table, model_state["encoder.blocks.0.attn.rpe.table"])
    report = ours.load_report
    assert report.source == "pretrain checkpoint (lomar)" and report.fresh == []
    assert "mask_token" in report.dropped and "head.weight" in report.dropped
    export_encoder(ours, tmp_path / "exp")
    from_dir = load_pretrained_encoder(tmp_path / "exp")
    export_encoder(ours, tmp_path / "run", weights_name="encoder.safetensors")  # what a pretrain run leaves
    from_run = load_pretrained_encoder(tmp_path / "run")
    original = tmp_path / "orig.pth"
    torch.save({"model": lomar_to_original(model_state)}, original)
    from_original = load_pretrained_encoder(original)  # 4x4 grid: the 7x7 default window must not matter
    assert from_original.load_report.source == "original checkpoint (lomar)"
    x = torch.randn(2, 3, 32, 32)
    ref = ours.forward_features(x)
    for other in (from_dir, from_run, from_original):
        torch.testing.assert_close(other.forward_features(x), ref)
    with_head = load_pretrained_encoder(pretrained, num_classes=5, img_size=48, drop_path=0.1)
    assert with_head(torch.randn(1, 3, 48, 48)).shape == (1, 5)
    assert sorted(with_head.load_report.fresh) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "newly initialised: fc_norm" in with_head.load_report.summary()
    with pytest.raises(ValueError, match="unknown encoder setting"):
        load_pretrained_encoder(pretrained, mask_ratio=0.5)
    with pytest.raises(ValueError, match="expects"):
        load_pretrained_encoder(pretrained, embed_dim=64, num_heads=2)


def test_the_same_weights_in_any_form_give_the_same_new_head_and_later_draws(pretrained, tmp_path):
    """Reading a checkpoint draws nothing from the global RNG (some formats build a model to read it), so a
    finetune from last.pt, its export or an original checkpoint starts from the same head and streams."""
    export_encoder(load_pretrained_encoder(pretrained), tmp_path / "exp")
    original = tmp_path / "orig.pth"
    torch.save({"model": lomar_to_original(safe_load(pretrained)["model"])}, original)
    heads, draws = [], []
    for source in (pretrained, tmp_path / "exp", original):
        torch.manual_seed(0)
        heads.append(load_pretrained_encoder(source, num_classes=3).head.weight.detach())
        draws.append(torch.rand(4))
    for head, draw in zip(heads[1:], draws[1:]):
        assert torch.equal(head, heads[0]) and torch.equal(draw, draws[0])


def test_knn_and_linprobe_commands(pretrained, folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "knn.json"
    common = ["--data", str(folder), "--img-size", "32", "--workers", "0", "--device", "cpu"]
    devices, score = [], knn.knn_top1  # the scoring runs on --device (it ran on the CPU whatever the flag said)
    monkeypatch.setattr(knn, "knn_top1", lambda *args, **kw: devices.append(kw.get("device")) or score(*args, **kw))
    assert main(["knn", str(pretrained), *common, "--k", "3", "--json", str(out)]) == 0
    assert devices == ["cpu"]
    result = json.loads(out.read_text())
    assert 0 <= result["knn_top1"] <= 1 and result["val_images"] == {"scored": 6, "skipped": 0}
    assert main(["linprobe", str(pretrained), *common, "--epochs", "5", "--save", str(tmp_path / "p.pt")]) == 0
    captured = capsys.readouterr()
    assert "k-NN (k=3" in captured.out and "linear probe" in captured.out and "loaded" in captured.err
    assert "linear.weight" in safe_load(tmp_path / "p.pt")["probe"]


def test_a_linear_probe_that_diverges_is_an_error_naming_the_flag_not_a_score(pretrained, tmp_path, capsys):
    # NaN logits still gave an argmax: the run printed a top-1 (the share of class 0) and exited 0
    rng = np.random.default_rng(0)
    for split in ("train", "val"):  # classes of the same noise: no probe separates them, LARS's steps grow on
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(4):
                noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(noise).save(tmp_path / split / label / f"{i}.png")
    common = ["--data", str(tmp_path), "--img-size", "32", "--workers", "0", "--device", "cpu", "--epochs", "20",
              "--probe-batch-size", "4", "--protocol", "mae", "--warmup-epochs", "0"]
    assert main(["linprobe", str(pretrained), *common, "--blr", "1e37"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("lomar linprobe: error: the linear probe diverged: its weights "
                                                        "hold NaN or inf after 20 epochs; lower --blr (now 1e+37)")


@pytest.mark.parametrize("split", ["train", "val"])
def test_knn_takes_train_or_val_in_place_of_the_data_roots_split(pretrained, folder, tmp_path, split, capsys):
    other = tmp_path / split
    shutil.copytree(folder / split / "class0", other / "class0")
    shutil.copytree(folder / split / "class0", other / "extra")
    code = main(["knn", str(pretrained), "--data", str(folder), f"--{split}", str(other), "--img-size", "32",
                 "--workers", "0", "--device", "cpu"])
    assert code == 2 and f"only in {other}: ['extra']" in capsys.readouterr().err


def test_finetune_resume_refuses_renamed_class_folders(pretrained, folder, tmp_path, capsys, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "ft"
    shutil.copytree(folder, data)
    args = ["finetune", "--pretrained", str(pretrained), "--data", str(data), "--img-size", "32", "--batch-size", "4",
            "--workers", "0", "--out", str(out), "--device", "cpu", "--epochs", "2", "--max-steps", "1"]
    assert main(args) == 0
    for split in ("train", "val"):  # as many classes, so every weight still fits: labels 0 and 1 would swap
        (data / split / "class0").rename(data / split / "zebra")
    capsys.readouterr()

    def build(*args, **kwargs):  # the refusal came after the model's build and the pretrained weights' read
        raise AssertionError("the model was built")

    monkeypatch.setattr(finetune, "load_pretrained_encoder", build)
    assert main([*args[:-2], "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "only in the checkpoint: ['class0'], only in the data: ['zebra']" in err and err.count("\n") == 1


def test_finetune_evaluates_past_a_batch_of_only_unreadable_images(pretrained, folder, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "ft"
    shutil.copytree(folder, data)
    args = ["finetune", "--pretrained", str(pretrained), "--data", str(data), "--img-size", "32", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--epochs", "1"]
    for label in ("class0", "class1"):  # 11 a class: batches 4, 4, 4, 4, 4, 2, the last one wholly unreadable
        for i in range(8):
            shutil.copy(data / "val" / label / f"{i % 3}.png", data / "val" / label / f"x{i}.png")
    for name in ("x6.png", "x7.png"):  # 2 of 22: under the 10 % that stops a run
        (data / "val" / "class1" / name).write_bytes(b"")
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    top1 = safe_load(out / "best.pt")["metrics"]["top1"]
    assert 20 * top1 == pytest.approx(round(20 * top1))  # a share of the 20 read
    note = f"{data / 'val'}: 2 unreadable image(s) skipped, at most 10% of a split"  # as knn says it
    lines = capsys.readouterr().out.splitlines()
    assert lines[lines.index(note) + 1].startswith("step 3, end of epoch 0: top-1")
    assert main(["finetune", "--eval-only", "--pretrained", str(out), "--val", str(data / "val"), "--img-size", "32",
                 "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (f"lomar finetune: top-1 {100 * top1:.2f}% over 20 images "
                                                        f"({note}); {tmp_path / 'ev' / 'metrics.jsonl'}")
    for log in (out, tmp_path / "ev"):  # the run's record and --eval-only's hold the counts
        assert json.loads((log / "metrics.jsonl").read_text().splitlines()[-1])["val_images"] == {"scored": 20,
                                                                                                 "skipped": 2}
    for path in (data / "val").rglob("*.png"):
        path.write_bytes(b"")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"lomar finetune: error: no image in {data / 'val'} could be read (22 tried); fix or replace them"


def test_finetune_top1_and_top5_count_every_validation_image_once_not_a_mean_of_batches():
    """Batches 4 and 3: 4 of 7 right is top-1 4/7, where a mean of the batches' accuracies would say (1 + 0) / 2."""
    import contextlib
    from types import SimpleNamespace

    from torch.utils.data import Subset

    from lomar.train.distributed import DistInfo

    logits = torch.arange(6.0).repeat(7, 1)  # every image ranks class 5 first, class 0 last
    images = TensorDataset(logits, torch.tensor([5, 5, 5, 5, 4, 3, 0]))  # the last batch: 2 of 3 in the top 5
    images.root = Path("val")
    task = SimpleNamespace(model=torch.nn.Identity(), device=torch.device("cpu"), info=DistInfo(),
                           val_loader=DataLoader(Subset(images, range(7)), batch_size=4),
                           autocast=contextlib.nullcontext, classes=list("abcdef"), train_loader=None,
                           small_counted=True)  # images under the resize: tensors here, no files
    assert finetune.FinetuneTask.evaluate(task) == {"top1": pytest.approx(4 / 7), "top5": pytest.approx(6 / 7)}


def test_knn_monitor_for_the_pretraining_hook(pretrained, folder):
    from lomar.eval.knn import KnnMonitor

    monitor = KnnMonitor(folder, img_size=32, batch_size=5, workers=0, k=3)
    encoder = load_pretrained_encoder(pretrained).train()
    assert 0 <= monitor(encoder) <= 1 and encoder.training
    with pytest.raises(ValueError, match="train holds no train/ folder: it is a split itself; pass its parent"):
        KnnMonitor(folder / "train", img_size=32)  # no train/ and val/ inside


def test_finetune_two_steps_and_resume(pretrained, folder, tmp_path, capsys):
    out = tmp_path / "ft"
    # 12 training images, batch 4: 3 steps per epoch; 48 px from a 32 px pretraining (RPE).
    args = ["finetune", "--pretrained", str(pretrained), "--data", str(folder), "--img-size", "48",
            "--batch-size", "4", "--workers", "0", "--out", str(out), "--device", "cpu", "--log-every", "1"]
    assert main([*args, "--epochs", "2", "--max-steps", "2"]) == 0
    assert (out / "last.pt").is_file() and not (out / "best.pt").exists()  # a part-done epoch is never "best"
    captured = capsys.readouterr().out
    assert "top-1" in captured and "newly initialised: fc_norm" in captured
    first = safe_load(out / "last.pt")
    assert (first["step"], first["epoch"], first["batches_done"], first["num_classes"]) == (2, 0, 2, 2)
    assert main([*args, "--epochs", "2", "--max-steps", "2"]) == 2  # refuses to clobber a run
    assert main([*args, "--epochs", "1", "--resume", "auto"]) == 0  # finishes epoch 0: one more step
    last = safe_load(out / "last.pt")
    assert (last["step"], last["epoch"], last["batches_done"]) == (3, 1, 0)
    best = safe_load(out / "best.pt")
    assert best["classes"] == ["class0", "class1"] and 0 <= best["metrics"]["top1"] <= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert any("top1" in r for r in records) and not any("top5" in r for r in records)  # 2 classes: always 1
    # the finetuned checkpoint is itself a pretrained source (e.g. for k-NN)
    assert load_pretrained_encoder(out / "best.pt").load_report.source == "finetune checkpoint"
    capsys.readouterr()
    assert main([*args, "--epochs", "1", "--max-steps", "2", "--resume", "auto"]) == 2  # past step 3: refused unbuilt
    captured = capsys.readouterr()
    assert captured.err.startswith("lomar finetune: error: --resume: the run is at step 3, past step 2 where "
                                   "--max-steps 2 ends it") and "loaded" not in captured.out


@pytest.mark.parametrize("args, words", [
    (["--data", "/nope"], "is not a folder"),
    ([], "pass --data"),
    (["--data", "X", "--batch-size", "0"], "must be positive"),
    (["--data", "X", "--batch-size", "3"], "must be even"),
    (["--data", "X", "--resume", "/nope.pt"], "does not exist"),
])
def test_finetune_bad_flags(pretrained, args, words, capsys):
    assert main(["finetune", "--pretrained", str(pretrained), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command, args, words", [
    ("knn", ["--data", "/nope"], "is not a folder"),
    ("knn", ["--k", "0", "--data", "X"], "--k: expected an integer >= 1"),
    ("linprobe", [], "pass --data"),
    ("linprobe", ["--epochs", "0", "--data", "X"], "--epochs: expected an integer >= 1"),
    # the other protocol's flags are refused, not ignored: LARS would run without the weight decay asked for
    ("linprobe", ["--protocol", "mae", "--warmup-epochs", "1", "--weight-decay", "0.05", "--data", "X"],
     "--weight-decay is for --protocol adamw; --protocol mae does not read it: drop --weight-decay"),
    ("linprobe", ["--protocol", "mae", "--warmup-epochs", "1", "--lr", "0.1", "--data", "X"], "--lr is for --protocol"),
    ("linprobe", ["--blr", "5", "--data", "X"], "--blr is for --protocol mae; --protocol adamw does not read it"),
])
def test_probe_bad_flags(pretrained, command, args, words, capsys):
    assert main([command, str(pretrained), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_finetune_under_torchrun_with_two_processes(pretrained, folder, tmp_path):
    """Every classifier parameter gets a gradient (no unused final norm is kept), so DDP's reducer does not stall:
    a stalled rank is reported as hung."""
    from helpers import as_torchrun

    out = tmp_path / "ddp"
    ranks = as_torchrun(["finetune", "--pretrained", str(pretrained), "--data", str(folder), "--img-size", "32",
                         "--batch-size", "2", "--workers", "0", "--threads", "1", "--out", str(out), "--device", "cpu",
                         "--epochs", "1", "--max-steps", "2"], 2, tmp_path, timeout=300)
    assert [code for code, _, _ in ranks] == [0, 0], "".join(o + e for _, o, e in ranks)[-3000:]
    assert safe_load(out / "last.pt")["step"] == 2


def test_finetune_sigusr1_checkpoints_mid_epoch_and_resumes(pretrained, folder, tmp_path, capsys, monkeypatch):
    import os
    import signal

    import lomar.train.lifecycle as finetune

    real, calls = finetune.any_rank_stopping, []

    def signal_during_step_2(stop, device, work_ahead):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(stop, device, work_ahead)

    out = tmp_path / "ft"
    args = ["finetune", "--pretrained", str(pretrained), "--data", str(folder), "--img-size", "32",
            "--batch-size", "4", "--workers", "0", "--out", str(out), "--device", "cpu", "--epochs", "2"]
    before = signal.getsignal(signal.SIGUSR1)
    monkeypatch.setattr(finetune, "any_rank_stopping", signal_during_step_2)
    assert main(args) == 0
    monkeypatch.undo()
    assert "stopped by SIGUSR1 at step 2" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers given back
    ckpt = safe_load(out / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["batches_done"]) == (2, 0, 2)
    assert main([*args, "--resume", "auto"]) == 0  # the rest: 1 step of epoch 0, 3 of epoch 1
    last = safe_load(out / "last.pt")
    assert (last["step"], last["epoch"]) == (6, 2) and (out / "best.pt").is_file()


def test_knn_of_a_stopped_run_folder_reads_its_last_checkpoint(pretrained, folder, tmp_path, capsys):
    """A run stopped by a signal has last.pt but no export yet: its last checkpoint is read, not refused as 'a
    folder without config.json; pass ... a folder written by lomar pretrain', which it is."""
    run = tmp_path / "stopped"
    run.mkdir()
    shutil.copy(pretrained, run / "last.pt")
    common = ["--data", str(folder), "--img-size", "32", "--workers", "0", "--device", "cpu", "--k", "3"]
    assert main(["knn", str(run), *common, "--json", str(tmp_path / "a.json")]) == 0, capsys.readouterr().err
    step = safe_load(pretrained)["step"]  # `lomar pretrain ... && lomar knn RUN` gets here after a stop (exit 0)
    said = capsys.readouterr()
    assert f"{run} holds no export, so its run has not finished: loaded its last checkpoint, saved at step {step}" \
        in said.out + said.err
    assert main(["knn", str(pretrained), *common, "--json", str(tmp_path / "b.json")]) == 0
    said = capsys.readouterr()
    assert f"saved at step {step}" in said.out + said.err and "no export" not in said.out + said.err
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())


def test_knn_and_linprobe_score_trivially_separable_classes_at_100_percent(pretrained, tmp_path, capsys):
    """Red against blue images: any encoder's features separate them, so anything below 100 % is a bug in the
    scoring (labels, pooling, the probe's training), not the model's."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 4)):
        for label, colour in (("blue", (30, 30, 220)), ("red", (220, 30, 30))):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.png")
    common = ["--data", str(tmp_path), "--img-size", "32", "--workers", "0", "--device", "cpu"]
    assert main(["knn", str(pretrained), *common, "--k", "3"]) == 0
    assert main(["linprobe", str(pretrained), *common, "--epochs", "20"]) == 0
    assert main(["linprobe", str(pretrained), *common, "--pool", "cls", "--epochs", "20"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "top-1" in ln]
    assert len(lines) == 3 and all("top-1: 100.00% (8 val / 12 train images)" in ln for ln in lines), lines
