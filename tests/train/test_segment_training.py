"""Short `lomar segment` runs on the composed digits set: what a run writes and scores, its loss, clipping, schedule
and position table, an exact resume, VOC-style masks, two torchrun processes, and a SIGTERM checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from segment_cli import _segment

from helpers import applied_grad_norms
from lomar.checkpoints.io import safe_load
from lomar.checkpoints.kinds import SEGMENT_TASK
from lomar.cli.app import main
from lomar.train.segment_config import SegmentConfig


def test_without_the_auxiliary_head_the_loss_is_the_decode_heads_and_a_cut_warm_up_is_said(digits, tmp_path, capsys):
    out = tmp_path / "run"
    assert _segment(digits, out, "--model", "vit_mini_patch16", "--max-steps", "1", "--eval-every", "50",
                    "--aux-weight", "0", "--warmup-steps", "1500") == 0
    # mmseg's 1500 warm-up steps in a 1-step run: cut to the run, which never reaches its lr; said once, at the start
    err = capsys.readouterr().err
    assert err.count("--warmup-steps 1500 is longer than this run's 1-step lr schedule") == 1, err
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert step["step"] == 1 and "loss_aux" not in step and step["loss"] == step["loss_decode"]


def test_clip_grad_clips_the_gradient(digits, tmp_path):
    # --clip-grad: a diverging segmentation run's other fix besides a lower --lr
    out = tmp_path / "run"
    norms = applied_grad_norms(lambda: _segment(digits, out, "--model", "vit_mini_patch16", "--max-steps", "2",
                                                "--eval-every", "50", "--eval-mode", "whole", "--clip-grad", "0.001"))
    assert norms == pytest.approx([0.001, 0.001], rel=1e-3)
    assert yaml.safe_load((out / "config.yaml").read_text())["clip_grad"] == 0.001


def test_two_step_run_writes_miou_per_class_scores_and_predictions(digits, pretrained, tmp_path, capsys):
    data, out = tmp_path / "named", tmp_path / "run"
    shutil.copytree(digits, data)
    names = [f"digit{d}" for d in range(10)]  # ADE's class list beside the splits names the classes
    (data / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + "".join(
        f"{d + 1}\t0.1\t1\t1\t{name}, synonym\n" for d, name in enumerate(names)))
    assert _segment(data, out, "--pretrained", str(pretrained), "--max-steps", "2", "--eval-mode", "whole",
                    "--eval-every", "1", "--no-train-pos-embed") == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "lomar segment: pretrained: loaded" in captured.out  # what it trains: stdout, as the start-up line
    # LoMaR's
    assert "relative position term: none added (the encoder's own iRPE gives its attention" in captured.out
    assert ("lomar segment: note: --no-train-pos-embed is unused: it acts on an absolute position table (MAE's), "
            "and this encoder has none\n") in err  # LoMaR's: iRPE
    # the per-class table at the final evaluation only, not at step 1's
    assert captured.out.count("lomar segment: lowest IoU (%): ") == 1  # percent, as every printed score
    assert f"every class in {out / 'per_class.md'}" in captured.out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    for r in (r for r in records if "loss" in r):  # the decode and the weighted auxiliary head's losses
        assert r["loss"] == pytest.approx(r["loss_decode"] + r["loss_aux"], rel=1e-6) and r["loss_aux"] > 0
    final = records[-1]
    assert final["step"] == 2 and 0 <= final["mIoU"] <= 100 and {"mAcc", "aAcc"} <= set(final)
    stems = sorted(p.stem for p in (digits / "images" / "validation").glob("*.jpg"))
    assert sorted(p.stem for p in (out / "predictions").glob("*.png")) == stems
    pred = np.asarray(Image.open(out / "predictions" / f"{stems[0]}.png"))
    assert pred.shape == (32, 32) and 1 <= pred.min() and pred.max() <= 10
    # each class's IoU and Acc, counted by hand from the predictions written and the annotations (0 unlabelled)
    pred, labels = (np.stack([np.asarray(Image.open(folder / f"{s}.png")).astype(int) for s in stems])
                    for folder in (out / "predictions", data / "annotations" / "validation"))
    for c in range(1, 11):
        tp, fp, fn = ((pred == c) & (labels == c)).sum(), ((pred == c) & (labels != c) & (labels > 0)).sum(), \
            ((pred != c) & (labels == c)).sum()
        assert final["IoU"][c - 1] == (pytest.approx(100 * tp / (tp + fp + fn)) if tp + fp + fn else None)
        assert final["Acc"][c - 1] == (pytest.approx(100 * tp / (tp + fn)) if tp + fn else None)
    table = (out / "per_class.md").read_text()
    assert "| 1 digit0 |" in table and "| 10 digit9 |" in table and "synonym" not in table
    # a run stopped between its last evaluation and its end: a resume there, nothing left to train, writes the table
    # again from that evaluation's record
    (out / "per_class.md").unlink()
    assert _segment(data, out, "--resume", "auto", "--max-steps", "2") == 0
    assert "nothing to do" in (said := capsys.readouterr().out) and "writing its missing per_class.md" in said
    assert (out / "per_class.md").read_text() == table


def test_random_init_is_said_and_resume_is_exact(digits, tmp_path, capsys):
    common = ("--model", "vit_mini_patch16", "--schedule-steps", "4", "--eval-mode", "slide", "--drop-path", "0.1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _segment(digits, straight, *common, "--max-steps", "4") == 0
    assert "random init vit_mini_patch16" in capsys.readouterr().out
    assert safe_load(straight / "last.pt")["settings"]["rel_pos"] == "none"  # LoMaR's encoder keeps its iRPE only
    assert _segment(digits, split, *common, "--max-steps", "2") == 0
    capsys.readouterr()
    assert _segment(digits, split, "--resume", "auto", "--max-steps", "4") == 0
    # the resume's model is the run's, not a new random one
    said = capsys.readouterr().out
    assert f"lomar segment: model rebuilt from the run's checkpoint {split / 'last.pt'} (step 2);" in said
    assert "random init" not in said
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(split / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in x]
              for run in (straight, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_binary_masks_with_zero_label_class_train_and_score_the_background(digits, tmp_path, capsys):
    """VOC-style data (0 = background, a class): --zero-label class trains and scores label 0, predictions are the
    class ids, the mIoU is the hand count over every pixel; a resume keeps the mode and refuses another."""
    from torchmetrics.classification import MulticlassJaccardIndex

    data = tmp_path / "binary"
    shutil.copytree(digits, data)
    for label in (data / "annotations").rglob("*.png"):  # 0 background, 1 any digit
        Image.fromarray((np.asarray(Image.open(label)) > 0).astype(np.uint8)).save(label)
    out = tmp_path / "run"
    assert _segment(data, out, "--num-classes", "2", "--zero-label", "class", "--model", "vit_mini_patch16",
                    "--max-steps", "1", "--schedule-steps", "2", "--eval-every", "50", "--eval-mode", "whole") == 0, \
        capsys.readouterr().err
    resume = ["segment", "--out", str(out), "--resume", "auto", "--workers", "0", "--threads", "1"]
    assert main([*resume, "--max-steps", "2"]) == 0, capsys.readouterr().err
    ckpt = safe_load(out / "last.pt")
    assert ckpt["step"] == 2 and ckpt["settings"]["zero_label"] == "class"
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    stems = sorted(p.stem for p in (data / "images" / "validation").glob("*.jpg"))
    pred = torch.stack([torch.from_numpy(np.asarray(Image.open(out / "predictions" / f"{s}.png")).astype(np.int64))
                        for s in stems])
    labels = torch.stack([torch.from_numpy(np.asarray(Image.open(data / "annotations" / "validation" / f"{s}.png"))
                                           .astype(np.int64)) for s in stems])
    assert pred.max() <= 1 and (labels == 0).any()  # class ids, not class + 1; the background is labelled
    assert final["mIoU"] == pytest.approx(100 * float(MulticlassJaccardIndex(2, average="macro")(pred, labels)),
                                          abs=1e-3)
    capsys.readouterr()
    assert main([*resume, "--max-steps", "3", "--zero-label", "ignore"]) == 2
    err = capsys.readouterr().err
    assert "--zero-label" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("model, size", [("vit_mini_patch14", "28"), ("vit_mini_patch8", "16")])
def test_the_smallest_img_size_the_pyramid_tiles_trains_and_evaluates(digits, tmp_path, model, size):
    # twice the patch is the coarsest stride (the max pool of the grid), which the whole-image evaluation pads to;
    # no multiple of 32 besides: 28 for patch 14, 16 for patch 8 (a multiple of 32 too would ask 224 and 32)
    out = tmp_path / "run"
    assert _segment(digits, out, "--model", model, "--img-size", size, "--max-steps", "1", "--eval-mode", "whole") == 0
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["step"] == 1 and 0 <= final["mIoU"] <= 100
    assert np.asarray(Image.open(next((out / "predictions").glob("*.png")))).shape == (32, 32)


@pytest.mark.slow
def test_torchrun_two_processes_train_and_gather_every_prediction(digits, tmp_path):
    """2 gloo processes: DDP training, the confusion matrices summed, every rank's predictions written."""
    from helpers import as_torchrun

    out = tmp_path / "run"
    ranks = as_torchrun(["segment", "--data", str(digits), "--num-classes", "10", "--img-size", "32",
                         "--batch-size", "2", "--head-channels", "16", "--warmup-steps", "1", "--lr", "1e-3",
                         "--workers", "0", "--threads", "1", "--device", "cpu", "--log-every", "1", "--max-steps", "2",
                         "--eval-mode", "whole", "--model", "vit_mini_patch16", "--out", str(out)], 2, tmp_path,
                        timeout=300)
    log = "".join(printed + said for _, printed, said in ranks)
    assert [code for code, _, _ in ranks] == [0, 0], log[-3000:]
    assert "x 2 process(es)" in log and "lomar segment: done at step 2" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    for r in (r for r in records if "loss" in r):  # the parts are averaged over both processes as the loss is
        assert r["loss"] == pytest.approx(r["loss_decode"] + r["loss_aux"], rel=1e-6)
    assert records[-1]["step"] == 2 and 0 <= records[-1]["mIoU"] <= 100
    stems = sorted(p.stem for p in (digits / "images" / "validation").glob("*.jpg"))
    assert sorted(p.stem for p in (out / "predictions").glob("*.png")) == stems
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2


def test_settings_saved_before_the_distortion_and_the_trained_table_read_as_off():
    old = SegmentConfig.saved_settings({"task": SEGMENT_TASK, "settings": {"lr": 1e-4}}, Path("old.pt"))
    new = SegmentConfig.saved_settings({"task": SEGMENT_TASK, "settings": {"photometric": True}}, Path("new.pt"))
    assert old["photometric"] is False and new["photometric"] is True and old["train_pos_embed"] is False
    assert old["rel_pos"] == "none"  # those runs' encoders had no relative position table
    assert old["zero_label"] == "ignore"  # ADE's convention, the only one then
    assert SegmentConfig().photometric is True  # a new run follows mmseg's pipeline


def test_the_schedule_is_told_by_the_class_so_a_resume_past_it_is_refused_before_the_build():
    """mmseg's warm-up then poly down to min_lr at --poly-power, as the built run follows it."""
    from lomar.train.schedule import schedule_overrun
    from lomar.train.segment import SegmentTask

    lr = SegmentTask.lr_schedule_of(SegmentConfig(poly_power=2.0))
    assert lr(0, 10, 2, 1e-3, 1e-5) == pytest.approx(1e-9) and lr(2, 10, 2, 1e-3, 1e-5) == pytest.approx(1e-3)
    assert lr(6, 10, 2, 1e-3, 1e-5) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.25)  # halfway, squared
    assert lr(10, 10, 2, 1e-3, 1e-5) == pytest.approx(1e-5)
    assert "steps 11-12 would all train at min_lr 1e-05;" in schedule_overrun(12, 10.0, 2.0, 1e-3, 1e-5, lr)


def test_a_two_step_schedules_warning_and_resume_refusal_say_which_lr_each_is():
    """--max-steps 2 cuts the default warm-up to the whole schedule: its step 2 trains at half the peak lr, which
    only the steps past its end would reach. The warning's lr and the refusal's are each named, and agree."""
    from types import SimpleNamespace

    from lomar.train.schedule import schedule_overrun, warmup_warning
    from lomar.train.segment import SegmentTask

    lr = SegmentTask.lr_schedule_of(SegmentConfig())
    warned = warmup_warning(2, 2.0, 2.0, 1e-3, 0.0, lr, config=SimpleNamespace(warmup_steps=1500))
    assert "never decays: the lr rises only to 0.0005, at its last step, short of the peak lr 0.001;" in warned
    refused = schedule_overrun(4, 2.0, 2.0, 1e-3, 0.0, lr, config=SimpleNamespace(max_steps=4, resume="last.pt"))
    assert ("steps 3-4 would all train at the peak lr 0.001, which its warm-up reaches only where its schedule ends: "
            "its last step, 2, trains at 0.0005; end it at --max-steps 2") in refused, refused


def test_an_mae_tables_training_follows_train_pos_embed(digits, image_dir, tmp_path):
    """The backbone trains an absolute table by default; --no-train-pos-embed keeps it out of the optimizer."""
    from helpers import pretrain

    pre = tmp_path / "mae"
    assert pretrain("--data", str(image_dir), "--out", str(pre), "--method", "mae", "--windows", "0",
                    "--max-steps", "1", "--decoder-embed-dim", "16", "--decoder-depth", "1",
                    "--decoder-num-heads", "2") == 0
    table = safe_load(pre / "last.pt")["model"]["encoder.pos_embed"]
    counts = {}
    for trained in (True, False):
        out = tmp_path / f"seg-{trained}"
        flags = [] if trained else ["--no-train-pos-embed"]
        assert _segment(digits, out, "--pretrained", str(pre / "last.pt"), "--max-steps", "1", "--eval-mode",
                        "whole", "--lr", "1e-2", "--warmup-steps", "0", "--schedule-steps", "2", *flags) == 0
        ckpt = safe_load(out / "last.pt")
        assert torch.equal(ckpt["model"]["backbone.encoder.pos_embed"], table) != trained
        counts[trained] = sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
    assert counts[True] == counts[False] + 1
    # mmsegmentation's MAE backbone: a relative position table per block, from zero, trained (weight decay: 2-D)
    assert ckpt["settings"]["rel_pos"] == "bias"
    tables = [v for k, v in ckpt["model"].items() if k.endswith(".attn.relative_position_bias_table")]
    assert len(tables) == sum(k.startswith("backbone.encoder.blocks.") and k.endswith(".attn.qkv.weight")
                              for k in ckpt["model"])
    assert tables and all(t.shape == (7 * 7 + 3, tables[0].shape[1]) and t.abs().sum() > 0 for t in tables)
    assert main(["segment", "--out", str(out), "--resume", "auto", "--max-steps", "2", "--workers", "0",
                 "--threads", "1"]) == 0  # the recorded (resolved) term is rebuilt
    assert safe_load(out / "last.pt")["step"] == 2


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_and_exits_0(digits, tmp_path):
    """As a scheduler (or torchrun) signals it: the loader workers get SIGTERM too, and they leave it to the main
    process; one that died of it ended the run in a 'worker killed' error, without the stop's checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lomar", "segment", "--data", str(digits), "--num-classes", "10", "--img-size", "32",
           "--batch-size", "2", "--head-channels", "16", "--warmup-steps", "1", "--epochs", "1000", "--workers", "1",
           "--threads", "1", "--device", "cpu", "--log-every", "1", "--model", "vit_mini_patch16", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    metrics, deadline = out / "metrics.jsonl", time.time() + 600
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by SIGTERM" in output, output
    assert safe_load(out / "last.pt")["step"] >= 2
