"""lomar segment: UperNet shapes, the metrics against torchmetrics, sliding windows, bad inputs in one
line each, and short CLI runs on the composed digits set (a 2-step run, an exact resume)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from helpers import applied_grad_norms
from lomar.checkpoints.io import safe_load
from lomar.checkpoints.kinds import SEGMENT_TASK
from lomar.cli.app import main
from lomar.data.compose import compose_digits
from lomar.eval.segmentation import confusion_matrix, predict_logits, segmentation_metrics
from lomar.integrations.segmenter import layer_decay_groups
from lomar.models.segmenter import UperNetSegmenter, segmentation_losses, spread_indices
from lomar.models.upernet import UPerHead
from lomar.models.vit import VisionTransformer, ViTConfig
from lomar.train.segment_config import SegmentConfig


def _encoder(depth: int = 4) -> VisionTransformer:
    return VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2))


def test_spread_indices_are_mmsegs_for_base_and_large():
    assert spread_indices(12) == (3, 5, 7, 11)
    assert spread_indices(24) == (7, 11, 15, 23)
    assert spread_indices(4) == (0, 1, 2, 3)


def test_upernet_shapes():
    head = UPerHead([8, 16, 24, 32], num_classes=5, channels=16)
    levels = [torch.randn(2, c, 32 // 2**i, 48 // 2**i) for i, c in enumerate([8, 16, 24, 32])]
    assert head(levels).shape == (2, 5, 32, 48)
    model = UperNetSegmenter(_encoder(), num_classes=7, channels=16, aux_channels=8)
    logits, aux = model(torch.randn(2, 3, 64, 96), aux=True)
    assert logits.shape == aux.shape == (2, 7, 64, 96)
    assert [m.shape[-2:] for m in model.backbone(torch.randn(1, 3, 64, 64))] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    labels = torch.randint(0, 7, (2, 64, 96))
    labels[0, :10] = 255
    model.loss(torch.randn(2, 3, 64, 96), labels).backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_layer_decay_scales_the_encoder_by_depth():
    model = UperNetSegmenter(_encoder(depth=4), num_classes=3, channels=8, aux_channels=8)
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    enc = model.encoder
    assert scale[id(enc.patch_embed.proj.weight)] == 0.5**5
    assert scale[id(enc.blocks[0].mlp[0].weight)] == 0.5**4 and scale[id(enc.blocks[3].mlp[0].weight)] == 0.5
    assert scale[id(model.decode_head.classifier.weight)] == 1.0
    assert decay[id(enc.cls_token)] == decay[id(enc.blocks[0].norm1.weight)] == 0.0
    assert decay[id(enc.blocks[0].attn.qkv.weight)] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_torchmetrics(seed):
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    gen = torch.Generator().manual_seed(seed)
    n = 6
    labels = torch.randint(0, n, (3, 40, 50), generator=gen)
    pred = torch.where(torch.rand(labels.shape, generator=gen) < 0.6, labels, torch.randint(0, n, labels.shape,
                                                                                             generator=gen))
    labels[:, :5] = 255  # ignored pixels
    ours = segmentation_metrics(confusion_matrix(pred, labels, n))
    iou = MulticlassJaccardIndex(n, average="macro", ignore_index=255)(pred, labels)
    macc = MulticlassAccuracy(n, average="macro", ignore_index=255)(pred, labels)
    aacc = MulticlassAccuracy(n, average="micro", ignore_index=255)(pred, labels)
    assert ours["mIoU"] == pytest.approx(100 * float(iou), abs=1e-4)
    assert ours["mAcc"] == pytest.approx(100 * float(macc), abs=1e-4)
    assert ours["aAcc"] == pytest.approx(100 * float(aacc), abs=1e-4)


def test_metrics_skip_undefined_classes_as_mmseg_does():
    labels = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])  # class 2 is never labelled (no accuracy), class 3 nowhere (no IoU)
    m = segmentation_metrics(confusion_matrix(pred, labels, 4))
    assert m["mIoU"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    assert m["mAcc"] == pytest.approx(100 * (0.5 + 1) / 2)
    assert m["aAcc"] == pytest.approx(75.0)


def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    model = torch.nn.Conv2d(3, 4, 1)
    image = torch.randn(1, 3, 50, 70)
    whole = predict_logits(model, image, 4, "whole")
    slide = predict_logits(model, image, 4, "slide", crop=32, stride=21)
    small = predict_logits(model, image[..., :20, :20], 4, "slide", crop=32, stride=21)
    assert whole.shape == slide.shape == (1, 4, 50, 70) and small.shape == (1, 4, 20, 20)
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(small, whole[..., :20, :20])



@pytest.mark.parametrize("patch, padded", [(14, (56, 84)), (16, (64, 96))])
def test_whole_image_evaluation_pads_to_the_pyramids_coarsest_stride(patch, padded):
    # a fixed 32 gave a patch-14 encoder (ViT-H/14) sides that are no multiple of its patch: a crash at the first
    # --eval-mode whole evaluation, after training
    encoder = VisionTransformer(ViTConfig(img_size=2 * patch, patch_size=patch, embed_dim=16, depth=4, num_heads=2))
    model = UperNetSegmenter(encoder, num_classes=3, channels=8, aux_channels=8).eval()
    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
    assert predict_logits(model, torch.randn(1, 3, 42, 70), 3, "whole").shape == (1, 3, 42, 70)
    assert seen == [padded]

# ---- the command ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "set"
    compose_digits(root, img_size=32, images=10, seed=0, digit_scale=(0.3, 0.5))
    return root


def _segment(data, out, *extra) -> int:
    return main(["segment", "--data", str(data), "--num-classes", "10", "--img-size", "32", "--batch-size", "2",
                 "--head-channels", "16", "--warmup-steps", "1", "--lr", "1e-3", "--workers", "0", "--threads", "1",
                 "--device", "cpu", "--log-every", "1", "--out", str(out), *extra])


def test_the_final_evaluation_can_be_the_best_checkpoint(digits, tmp_path, capsys):
    # evaluated only at the end (--eval-every beyond the run): that score is the run's best so far
    out = tmp_path / "run"
    assert _segment(digits, out, "--model", "vit_tiny_patch16", "--max-steps", "2", "--eval-every", "50",
                    "--eval-mode", "whole") == 0
    assert "best mIoU" in capsys.readouterr().out
    best = safe_load(out / "best.pt")
    assert best["step"] == 2 and best["metrics"]["mIoU"] == json.loads(
        (out / "metrics.jsonl").read_text().splitlines()[-1])["mIoU"]


def test_eval_only_scores_a_trained_segmenter_as_its_run_did(digits, tmp_path, capsys, monkeypatch):
    """--eval-only --pretrained RUN: the run's classes, size and evaluation, the same scores and predictions as its own
    final evaluation, the file and step scored in the record; what contradicts the segmenter is refused in one line."""
    run = tmp_path / "run"
    assert _segment(digits, run, "--model", "vit_tiny_patch16", "--max-steps", "2", "--eval-every", "50",
                    "--eval-mode", "whole", "--lr", "1e-2") == 0
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    evaluate = ["segment", "--eval-only", "--pretrained", str(run), "--workers", "0", "--threads", "1", "--device",
                "cpu"]
    capsys.readouterr()
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(f) or load(f, *a, **k))
    # --batch-size 1: scoring trains nothing, so training's BatchNorm minimum of 2 crops is not asked for
    assert main([*evaluate, "--out", str(tmp_path / "scored"), "--batch-size", "1"]) == 0, capsys.readouterr().err
    assert reads == [run / "best.pt"]  # read once: the settings checked and the weights scored are of one read
    monkeypatch.undo()
    # what it scores, as a run's start-up line: on stdout with the score line
    assert "lomar segment: segmenter loaded from " + str(run / "best.pt") + " (step 2), 32 px" in \
        capsys.readouterr().out
    scored = json.loads((tmp_path / "scored" / "metrics.jsonl").read_text())
    assert scored["eval_only"] is True and scored["checkpoint"] == str(run / "best.pt") and scored["step"] == 2
    assert {k: scored[k] for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "eval")} == \
        {k: final[k] for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "eval")}
    assert final["eval"] == {"mode": "whole", "stride": None}  # the run's records and --eval-only's say how they scored
    for png in (run / "predictions").glob("*.png"):
        assert (tmp_path / "scored" / "predictions" / png.name).read_bytes() == png.read_bytes()
    assert scored["img_size"] == scored["trained_img_size"] == 32
    assert "evaluation at 32 px, its trained size: mIoU" in (tmp_path / "scored" / "per_class.md").read_text()
    # another mode and stride than the run's: the record says which
    assert main([*evaluate, "--out", str(tmp_path / "slid"), "--eval-mode", "slide", "--eval-stride", "16"]) == 0
    assert json.loads((tmp_path / "slid" / "metrics.jsonl").read_text())["eval"] == {"mode": "slide", "stride": 16}
    # another size than its own (mmseg's testing at other scales): scored there, the record and table say both sizes;
    # a run's stride, of its own windows, is not taken there
    ckpt = safe_load(run / "best.pt")
    ckpt["settings"].update(eval_mode="slide", eval_stride=16)
    torch.save(ckpt, tmp_path / "slid.pt")
    capsys.readouterr()
    assert main([*evaluate, "--pretrained", str(tmp_path / "slid.pt"), "--out", str(tmp_path / "64"), "--img-size",
                 "64"]) == 0
    assert "(step 2), 64 px, not its trained 32 px" in capsys.readouterr().out
    at64 = json.loads((tmp_path / "64" / "metrics.jsonl").read_text())
    assert (at64["img_size"], at64["trained_img_size"], at64["eval"]) == (64, 32, {"mode": "slide", "stride": 42})
    assert 0 <= at64["mIoU"] <= 100
    assert "evaluation at 64 px, not its trained 32 px: mIoU" in (tmp_path / "64" / "per_class.md").read_text()
    # one saved before segment checkpoints kept their encoder's layout: rebuilt as its run's --model
    del ckpt["encoder_config"]
    ckpt["settings"].update(eval_mode="whole", eval_stride=None)
    torch.save(ckpt, tmp_path / "old.pt")
    assert main([*evaluate, "--pretrained", str(tmp_path / "old.pt"), "--out", str(tmp_path / "old")]) == 0
    assert "its encoder rebuilt as its run's --model vit_tiny_patch16" in capsys.readouterr().out
    old = json.loads((tmp_path / "old" / "metrics.jsonl").read_text())
    assert {k: old[k] for k in ("mIoU", "IoU", "Acc", "eval")} == {k: final[k] for k in ("mIoU", "IoU", "Acc", "eval")}
    torch.save({"model": {}}, tmp_path / "other.pt")
    for flags, message in [
        (["--num-classes", "5"], f"--num-classes 5 differs from the segmenter's own (10) in {run / 'best.pt'}; drop "
                                 f"--num-classes"),
        (["--img-size", "48"], f"--img-size must be a multiple of 32 (the coarsest pyramid stride: twice the patch "
                               f"size 16 of --pretrained {run}), got 48; e.g. 64"),
        (["--zero-label", "class"], "--zero-label class differs from the segmenter's own (ignore)"),
        (["--pretrained", str(tmp_path / "other.pt")], f"--pretrained {tmp_path / 'other.pt'} is not a `lomar "
                                                       f"segment` run or checkpoint; --eval-only scores a trained"),
        ([], "already holds predictions/"),  # the scores just written are not replaced unless asked to
    ]:
        assert main([*evaluate, "--out", str(tmp_path / "scored"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*evaluate, "--out", str(tmp_path / "ddp")]) == 2
    assert "--eval-only runs in one process; run it without torchrun" in capsys.readouterr().err


def test_eval_only_rebuilds_an_older_segmenter_from_the_encoder_its_run_started_from(digits, tmp_path, capsys):
    """A checkpoint saved before segment checkpoints kept their encoder's layout: rebuilt from the --pretrained encoder
    its run started from, scored as the run scored it, at other sizes too (an MAE table and bias tables resampled to a
    larger grid, read for a smaller one); that encoder missing or another one there, refused in one line."""
    from lomar.checkpoints.export import export_encoder

    start = tmp_path / "mae"
    export_encoder(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                                               pos="abs")), start)
    run = tmp_path / "run"
    assert _segment(digits, run, "--pretrained", str(start), "--max-steps", "1", "--eval-every", "50",
                    "--eval-mode", "whole") == 0
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    ckpt = safe_load(run / "best.pt")
    assert ckpt["settings"]["rel_pos"] == "bias"
    del ckpt["encoder_config"]
    torch.save(ckpt, tmp_path / "old.pt")
    evaluate = ["segment", "--eval-only", "--pretrained", str(tmp_path / "old.pt"), "--workers", "0", "--threads", "1",
                "--device", "cpu", "--out"]
    capsys.readouterr()
    assert main([*evaluate, str(tmp_path / "scored")]) == 0
    assert f"its encoder rebuilt from its run's starting encoder {start}" in capsys.readouterr().out
    scored = json.loads((tmp_path / "scored" / "metrics.jsonl").read_text())
    keys = ("mIoU", "IoU", "Acc", "eval")
    assert {k: scored[k] for k in keys} == {k: final[k] for k in keys}
    for png in (run / "predictions").glob("*.png"):
        assert (tmp_path / "scored" / "predictions" / png.name).read_bytes() == png.read_bytes()
    for size in (64, 16):
        assert main([*evaluate, str(tmp_path / f"at{size}"), "--img-size", str(size)]) == 0
        record = json.loads((tmp_path / f"at{size}" / "metrics.jsonl").read_text())
        assert (record["img_size"], record["trained_img_size"]) == (size, 32) and 0 <= record["mIoU"] <= 100
    capsys.readouterr()
    export_encoder(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2,
                                               pos="abs")), tmp_path / "wider")
    old = f"--pretrained {tmp_path / 'old.pt'} is a `lomar segment` checkpoint saved without its encoder's layout"
    ckpt["settings"]["pretrained"] = str(tmp_path / "wider")
    torch.save(ckpt, tmp_path / "wider.pt")
    # a LoMaR encoder of the same shapes there, which takes no bias table
    export_encoder(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)),
                   tmp_path / "lomar")
    ckpt["settings"]["pretrained"] = str(tmp_path / "lomar")
    torch.save(ckpt, tmp_path / "lomar.pt")
    shutil.move(start, tmp_path / "moved")
    for name, message in [
        ("old.pt", f"{old}: it is rebuilt from the encoder its run started from, {start}, which is missing; put that "
                   f"encoder (a copy or its export) back at {start}"),
        ("wider.pt", f"its encoder rebuilt from its run's starting encoder {tmp_path / 'wider'} does not fit its "
                     f"weights: size mismatch for cls_token"),
        ("lomar.pt", f"its encoder rebuilt from its run's starting encoder {tmp_path / 'lomar'} fails: --rel-pos "
                     f"bias: rel_pos 'bias' is for encoders without iRPE (MAE's); a LoMaR encoder has its own "
                     f"relative position: use auto or none; put the encoder its run started from back at "
                     f"{tmp_path / 'lomar'}"),
    ]:
        assert main([*evaluate, str(tmp_path / "refused"), "--pretrained", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_without_the_auxiliary_head_the_loss_is_the_decode_heads_and_a_cut_warm_up_is_said(digits, tmp_path, capsys):
    out = tmp_path / "run"
    assert _segment(digits, out, "--model", "vit_tiny_patch16", "--max-steps", "1", "--eval-every", "50",
                    "--aux-weight", "0", "--warmup-steps", "1500") == 0
    # mmseg's 1500 warm-up steps in a 1-step run: cut to the run, which never reaches its lr; said once, at the start
    err = capsys.readouterr().err
    assert err.count("--warmup-steps 1500 is longer than this run's 1-step lr schedule") == 1, err
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert step["step"] == 1 and "loss_aux" not in step and step["loss"] == step["loss_decode"]


def test_clip_grad_clips_the_gradient(digits, tmp_path):
    # --clip-grad: a diverging segmentation run's other fix besides a lower --lr
    out = tmp_path / "run"
    norms = applied_grad_norms(lambda: _segment(digits, out, "--model", "vit_tiny_patch16", "--max-steps", "2",
                                                "--eval-every", "50", "--eval-mode", "whole", "--clip-grad", "0.001"))
    assert norms == pytest.approx([0.001, 0.001], rel=1e-3)
    assert yaml.safe_load((out / "config.yaml").read_text())["clip_grad"] == 0.001


def test_the_loss_is_mmsegs_mean_over_every_pixel_and_unlabelled_data_scores_nothing(digits, tmp_path, capsys):
    """mmseg averages the cross-entropy over all pixels, an ignored one counting 0 (avg_non_ignore=False): a
    batch without a labelled pixel trains on 0, not NaN. A validation split without one has no metric (null in
    metrics.jsonl, which must stay JSON), and the printed line says so."""
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 4, 3, 5), torch.randint(0, 4, (2, 3, 5))
    labels[0, 0] = 255
    losses = segmentation_losses(logits, logits * 2, labels, 0.4)
    labelled = labels != 255
    expected = F.cross_entropy(logits, labels.clamp(max=3), reduction="none")[labelled].sum() / labels.numel()
    torch.testing.assert_close(losses["loss_decode"], expected)
    assert float(segmentation_losses(logits, None, torch.full_like(labels, 255), 0.4)["loss_decode"]) == 0

    data = tmp_path / "unlabelled"
    shutil.copytree(digits, data)
    for label in (data / "annotations").rglob("*.png"):  # 0: no class (ignored, as mmseg's reduce_zero_label)
        Image.fromarray(np.zeros_like(np.asarray(Image.open(label)))).save(label)
    out = tmp_path / "run"
    # a whole epoch: its evaluation is a best.pt candidate, whose comparison of None with a float raised TypeError
    assert _segment(data, out, "--model", "vit_tiny_patch16", "--epochs", "1") == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == 0 and records[-1]["mIoU"] is None and records[-1]["aAcc"] is None
    printed = capsys.readouterr().out
    assert "no metric defined: the validation split held nothing to score" in printed
    assert "no best.pt: no full epoch scored a mIoU yet" in printed  # it said no epoch had been evaluated


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
    common = ("--model", "vit_tiny_patch16", "--schedule-steps", "4", "--eval-mode", "slide", "--drop-path", "0.1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _segment(digits, straight, *common, "--max-steps", "4") == 0
    assert "random init vit_tiny_patch16" in capsys.readouterr().out
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
    assert _segment(data, out, "--num-classes", "2", "--zero-label", "class", "--model", "vit_tiny_patch16",
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


def _bad(root, case):
    """Break a copy of the digits set the way ``case`` says; the file the error must name."""
    labels, images = root / "annotations" / "training", root / "images" / "training"
    first = sorted(labels.glob("*.png"))[0]
    if case == "wrong size":
        Image.fromarray(np.zeros((16, 20), np.uint8)).save(first)
        return first
    if case == "class id above":
        Image.fromarray(np.full((32, 32), 11, np.uint8)).save(first)
        return first
    if case == "corrupt annotation":
        first.write_bytes(b"not a png")
        return first
    if case == "colour annotation":
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(first)
        return first
    if case == "missing annotation":
        first.unlink()
        return images / f"{first.stem}.jpg"
    if case == "missing image":
        (images / f"{first.stem}.jpg").unlink()
        return first
    if case == "empty split":
        shutil.rmtree(root / "images" / "validation")
        (root / "images" / "validation").mkdir()
        return root / "images" / "validation"
    raise AssertionError(case)


@pytest.mark.parametrize("case, fix", [
    ("wrong size", "write the annotation at the image's size"),
    ("class id above", "pass --num-classes 11 or fix the annotation"),
    ("corrupt annotation", "rewrite it as a PNG of class ids"),
    ("colour annotation", "single-channel (mode L or P) PNG"),
    ("missing annotation", "add it or remove the image"),
    ("missing image", "add the image or remove the annotation"),
    ("empty split", "an empty split"),
])
def test_bad_inputs_end_in_one_line_naming_the_file(digits, tmp_path, capsys, case, fix):
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    named = _bad(root, case)
    assert _segment(root, tmp_path / "run", "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("lomar segment: error: ") and err.count("\n") == 1, err
    assert str(named) in err and fix in err, err
    assert not (tmp_path / "run").exists()  # checked before the run folder is made


def test_too_many_images_cut_short_stop_the_run_in_one_line(digits, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    photos = sorted((root / "images" / "training").glob("*.jpg"))
    _cut_short(photos[0])
    assert _segment(root, tmp_path / "run", "--max-steps", "4", "--eval-every", "50") == 1
    err = capsys.readouterr().err
    read = len(photos) // 2 * 2  # a whole number of batches of 2 an epoch
    assert (f"1 image could not be used so far, over 10% of the {read} an epoch reads ({read // 2} batch(es) of 2 per "
            f"process), e.g. cannot decode image {photos[0]}") in err
    assert "Traceback" not in err


def test_too_many_validation_images_cut_short_stop_the_run_and_eval_only_with_exit_1(digits, tmp_path, capsys):
    """Found on its way, after training (as finetune's validation, and a run's training images): exit 1, in one line,
    the run's checkpoint kept; --eval-only of that checkpoint stops alike."""
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    photos = sorted((root / "images" / "validation").glob("*.jpg"))
    _cut_short(photos[0])
    run = tmp_path / "run"
    assert _segment(root, run, "--model", "vit_tiny_patch16", "--max-steps", "1", "--eval-every", "50",
                    "--eval-mode", "whole") == 1
    line = (f"{root / 'images' / 'validation'}: 1 of {len(photos)} images (over 10%) could not be used, e.g. cannot "
            f"decode image {photos[0]}")
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"lomar segment: error: {line}") and "Traceback" not in err
    assert (run / "last.pt").exists()
    assert main(["segment", "--eval-only", "--pretrained", str(run / "last.pt"), "--data", str(root), "--workers", "0",
                 "--threads", "1", "--device", "cpu", "--batch-size", "1", "--out", str(tmp_path / "ev")]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"lomar segment: error: {line}")


def _cut_short(photo: Path) -> None:
    """The header reads (start-up passes), the scan not: skipped with a warning when read."""
    data = photo.read_bytes()
    photo.write_bytes(data[:data.index(b"\xff\xda") + 20])


def _scoring(data: Path, out: Path, run: bool):
    """A SegmentTask of ``data``'s validation split whose model is one 1x1 convolution, evaluating in this process
    (``run``: a training run's evaluation, not --eval-only's)."""
    from types import SimpleNamespace

    from lomar.data.segmentation import SegmentationFolder
    from lomar.train.distributed import DistInfo
    from lomar.train.segment import SegmentTask

    task = SegmentTask.__new__(SegmentTask)
    task.config = SimpleNamespace(num_classes=10, eval_mode="whole", eval_stride=None, img_size=32, eval_only=not run,
                                  zero_label="ignore", out=str(out), pretrained="seg.pt", seed=0, device="cpu",
                                  threads=torch.get_num_threads())  # --eval-only sets it: keep this process's
    task.info, task.device, task.source, task.class_labels = DistInfo(), torch.device("cpu"), {}, list("0123456789")
    task.val_set = SegmentationFolder(data, "validation", 10, 32, train=False, workers=1)
    task.val_folder = data / "images" / "validation"
    task.model = torch.nn.Conv2d(3, 10, 1)
    return task


def test_a_score_over_part_of_the_validation_split_says_so(tmp_path, capsys, monkeypatch):
    """--eval-only's record and result line, and before every epoch line of a run, the images scored and skipped
    (each skipped one is warned of only at its first read); more than 10 % skipped stops in one line."""
    from lomar.train import segment
    from lomar.train.task import TrainingError

    data = tmp_path / "data"
    compose_digits(data, img_size=32, images=20, seed=0, val_fraction=0.5, digit_scale=(0.3, 0.5))
    photos = sorted((data / "images" / "validation").glob("*.jpg"))
    assert len(photos) == 10
    _cut_short(photos[0])
    note = f"{data / 'images' / 'validation'}: 1 unreadable image(s) skipped, at most 10% of a split"
    scoring = _scoring(data, tmp_path / "ev", run=False)
    monkeypatch.setattr(segment, "SegmentTask", lambda *args: scoring)
    assert segment.evaluate_only(scoring.config) == 0
    monkeypatch.undo()
    record = json.loads((tmp_path / "ev" / "metrics.jsonl").read_text())
    assert record["val_images"] == {"scored": 9, "skipped": 1}
    assert len(list((tmp_path / "ev" / "predictions").glob("*.png"))) == 9
    table = (tmp_path / "ev" / "per_class.md").read_text()
    assert "last evaluation over 9 images (1 unreadable skipped): mIoU " in table
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("lomar segment: mIoU ")
    assert line.endswith(f" over 9 images ({note}); {tmp_path / 'ev' / 'predictions'}")
    task = _scoring(data, tmp_path / "run", run=True)
    for _ in range(2):  # a run's evaluations: each says it, the epoch line following
        assert task.evaluate()["val_images"] == {"scored": 9, "skipped": 1}
        assert capsys.readouterr().out == note + "\n"
    _cut_short(photos[1])  # 2 of 10: over the 10 % a score may leave out
    with pytest.raises(TrainingError, match=rf"^{data / 'images' / 'validation'}: 2 of 10 images \(over 10%\) could "
                                            rf"not be used, e\.g\. cannot decode image {photos[0]}"):
        task.evaluate()


@pytest.mark.parametrize("flags, message", [
    (["--img-size", "48"], "--img-size must be a multiple of 32"),
    (["--num-classes", "300"], "--num-classes"),
    (["--eval-stride", "40"], "--eval-stride 40 is larger than the --img-size 32 windows it moves"),
    (["--batch-size", "1"], "--batch-size 1: UperNet's BatchNorm needs at least 2 crops per"),
    (["--model", "vit_tiny_patch14"], "--img-size must be a multiple of 28 (the coarsest pyramid stride: twice the "
                                      "patch size 14 of --model vit_tiny_patch14), got 32; e.g. 28"),
])
def test_bad_flags_end_in_one_line(digits, tmp_path, capsys, flags, message):
    assert _segment(digits, tmp_path / "run", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1



def test_a_pretrained_encoders_patch_sets_the_img_size_multiple(digits, tmp_path, capsys):
    # building it named the patch only and suggested 56, a size the next run refused (not a multiple of 32)
    from lomar.checkpoints.export import export_encoder

    encoder = VisionTransformer(ViTConfig(img_size=28, patch_size=14, embed_dim=16, depth=4, num_heads=2))
    export_encoder(encoder, tmp_path / "p14")
    assert _segment(digits, tmp_path / "run", "--pretrained", str(tmp_path / "p14")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--img-size must be a multiple of 28 (the coarsest pyramid stride: twice the " \
        f"patch size 14 of --pretrained {tmp_path / 'p14'}), got 32; e.g. 28" in err, err


@pytest.mark.parametrize("model, size", [("vit_mini_patch14", "28"), ("vit_mini_patch8", "16")])
def test_the_smallest_img_size_the_pyramid_tiles_trains_and_evaluates(digits, tmp_path, model, size):
    # twice the patch is the coarsest stride (the max pool of the grid), which the whole-image evaluation pads to;
    # a multiple of 32 as well was refused: 224 at least for patch 14, 32 for patch 8
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
                         "--eval-mode", "whole", "--model", "vit_tiny_patch16", "--out", str(out)], 2, tmp_path,
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
           "--threads", "1", "--device", "cpu", "--log-every", "1", "--model", "vit_tiny_patch16", "--out", str(out)]
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
