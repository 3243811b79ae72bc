"""Finetuning options of the original recipe: evaluation crop ratio by size, the training crop's area range
(--crop-scale), gradient accumulation (--accum-steps) and its resume, the classifier's input (--global-pool
cls|avg), fp16 with a loss scaler, gradient clipping, and a --min-lr above the peak refused."""

from __future__ import annotations

import pytest
import torch
import yaml
from finetune_cli import _finetune
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import CenterCrop, Resize

from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.data.classify import classification_transforms, eval_crop_ratio
from lomar.eval.features import load_pretrained_encoder
from lomar.models.vit import VisionTransformer, ViTConfig
from lomar.train import finetune as finetune_module


@pytest.mark.parametrize("size, ratio, resize", [(224, 0.875, 256), (160, 0.875, 182), (256, 1.0, 256),
                                                 (384, 1.0, 384)])
def test_eval_crop_ratio_is_one_above_224(size, ratio, resize):
    assert eval_crop_ratio(size) == ratio
    steps = classification_transforms(size, "none", 0.0)[1].transforms
    assert next(t for t in steps if isinstance(t, Resize)).size == resize
    assert next(t for t in steps if isinstance(t, CenterCrop)).size == (size, size)


def _crop_scale(train_tf) -> tuple[float, float]:
    (crop,) = [t for t in train_tf.transforms if isinstance(t, RandomResizedCropAndInterpolation)]
    return tuple(crop.scale)


def test_crop_scale_reaches_the_training_crop_and_is_part_of_the_recipe(tmp_path, capsys, pretrained, folder,
                                                                        monkeypatch):
    assert _crop_scale(classification_transforms(32, "none", 0.0)[0]) == (0.08, 1.0)  # timm's, the recipe's
    built = []

    def spy(*args, **kwargs):
        transforms = classification_transforms(*args, **kwargs)
        built.append(transforms[0])
        return transforms

    monkeypatch.setattr(finetune_module, "classification_transforms", spy)
    out = tmp_path / "run"
    assert _finetune(pretrained, folder, out, "--batch-size", "4", "--max-steps", "1", "--crop-scale", "0.5", "1") == 0
    assert built and {_crop_scale(tf) for tf in built} == {(0.5, 1.0)}
    assert tuple(safe_load(out / "last.pt")["settings"]["crop_scale"]) == (0.5, 1.0)
    capsys.readouterr()
    # a resume inherits it and may not change it: it shapes every training image
    assert main(["finetune", "--out", str(out), "--resume", "auto", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["crop_scale"] == [0.5, 1.0]
    assert main(["finetune", "--out", str(out), "--resume", "auto", "--crop-scale", "0.5", "1.0",
                 "--print-config"]) == 0
    capsys.readouterr()
    assert main(["finetune", "--out", str(out), "--resume", "auto", "--crop-scale", "0.08", "1"]) == 2
    err = capsys.readouterr().err
    assert "--crop-scale 0.08 1.0 differs from 0.5 1.0 in the run being resumed" in err and err.count("\n") == 1


def test_accumulating_two_half_batches_equals_one_full_batch(tmp_path, pretrained, folder):
    full, halves = tmp_path / "full", tmp_path / "halves"
    assert _finetune(pretrained, folder, full, "--batch-size", "4", "--epochs", "2") == 0
    assert _finetune(pretrained, folder, halves, "--batch-size", "2", "--accum-iter", "2", "--epochs", "2") == 0
    a, b = safe_load(full / "last.pt"), safe_load(halves / "last.pt")
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (4, 2)  # 8 images: 2 steps of 4 per epoch
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # Adam's moments see the mean gradient of the 4 images, not a sum over the 2 batches
    for index, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][index]["exp_avg"], state["exp_avg"],
                                   rtol=1e-4, atol=1e-7)
    # the lr follows the effective batch (2 x 2 = 4), not the per-step batch
    lrs = [g["lr"] for g in safe_load(halves / "last.pt")["optimizer"]["param_groups"]]
    assert lrs == [g["lr"] for g in a["optimizer"]["param_groups"]]


def test_accumulation_that_cannot_fill_a_step_is_one_line(tmp_path, capsys, pretrained, folder):
    assert _finetune(pretrained, folder, tmp_path / "run", "--batch-size", "4", "--accum-steps", "3") == 2
    err = capsys.readouterr().err
    assert "cannot fill one step of 3 batch(es) of 4" in err and err.count("\n") == 1


def test_cls_pool_classifies_the_normed_cls_token():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2),
                              num_classes=3, global_pool="cls")
    torch.nn.init.normal_(model.head.weight)
    assert not hasattr(model, "fc_norm") and isinstance(model.norm, torch.nn.LayerNorm)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), model.head(model.forward_features(images)[:, 0]))
    with pytest.raises(ValueError, match="global_pool must be avg or cls, got 'max'"):
        VisionTransformer(model.config, num_classes=3, global_pool="max")


def test_cls_pool_keeps_the_pretrained_norm_and_finetunes(tmp_path, capsys, pretrained, folder):
    encoder = safe_load(pretrained)["model"]
    model = load_pretrained_encoder(pretrained, num_classes=2, global_pool="cls")
    torch.testing.assert_close(model.norm.weight, encoder["encoder.norm.weight"])
    assert "norm.weight" not in model.load_report.dropped
    assert _finetune(pretrained, folder, tmp_path / "run", "--batch-size", "4", "--max-steps", "1",
                     "--global-pool", "cls") == 0
    ckpt = safe_load(tmp_path / "run" / "last.pt")
    assert ckpt["global_pool"] == "cls" and "norm.weight" in ckpt["model"] and "fc_norm.weight" not in ckpt["model"]
    assert _finetune(pretrained, folder, tmp_path / "bad", "--global-pool", "max") == 2
    assert "invalid choice: 'max'" in capsys.readouterr().err


def test_resume_with_accumulation_equals_an_uninterrupted_run(tmp_path, pretrained, folder, monkeypatch):
    # batch 2 x accum 2: 2 steps of 4 batches an epoch; the stop at step 3 is mid-epoch 1
    common = ("--batch-size", "2", "--accum-steps", "2", "--epochs", "3", "--mixup", "0.8")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _finetune(pretrained, folder, straight, *common, "--max-steps", "5") == 0
    assert _finetune(pretrained, folder, resumed, *common, "--max-steps", "3") == 0
    assert safe_load(resumed / "last.pt")["batches_done"] == 2  # two batches into epoch 1: one step
    checked, load = [], finetune_module.FinetuneTask.load
    monkeypatch.setattr(finetune_module.FinetuneTask, "load", lambda task, state: checked.append(load(task, state)))
    assert main(["finetune", "--out", str(resumed), "--resume", "auto", "--max-steps", "5"]) == 0
    assert len(checked) == 1  # the class check, before the model is built; not again after
    a, b = safe_load(straight / "last.pt"), safe_load(resumed / "last.pt")
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (5, 2)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)


def test_a_run_resumed_mid_epoch_with_loader_workers_augments_as_an_uninterrupted_one(tmp_path, pretrained, folder,
                                                                                   monkeypatch, capsys):
    """timm's augmentation draws from each worker's global streams: seeded once per worker, a resumed run's new
    workers would start them over and give the rest of the epoch other crops, ops and erasings. Seeded per sample,
    the resumed run augments as the uninterrupted one."""
    common = ("--batch-size", "2", "--epochs", "2", "--workers", "1", "--aa", "rand-m9-mstd0.5-inc1",
              "--reprob", "0.25", "--schedule-steps", "8")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _finetune(pretrained, folder, straight, *common, "--max-steps", "3") == 0
    assert _finetune(pretrained, folder, resumed, *common, "--max-steps", "1") == 0
    assert main(["finetune", "--out", str(resumed), "--resume", "auto", "--max-steps", "3"]) == 0
    a, b = safe_load(straight / "last.pt"), safe_load(resumed / "last.pt")
    assert a["step"] == b["step"] == 3 and a["batches_done"] == b["batches_done"] != 0  # still in the first epoch
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    # past the 8-step schedule: refused from the settings and the checkpoint, before the data, the model or the
    # pretrained encoder is read (a ViT-L's: seconds to wait for a refusal the flags decided)
    monkeypatch.setattr(finetune_module.FinetuneTask, "__init__", lambda *a: pytest.fail("built to be refused"))
    capsys.readouterr()
    assert main(["finetune", "--out", str(resumed), "--resume", "auto", "--epochs", "3", "--max-steps", "9"]) == 2
    assert "lr schedule ends at step 8 (--schedule-steps), but it would go on to step 9" in capsys.readouterr().err


def test_fp16_finetunes_with_a_loss_scaler(tmp_path, pretrained, folder):
    """The original finetunes in fp16 autocast with a loss scaler; the lifecycle's GradScaler does the scaling."""
    out = tmp_path / "fp16"
    assert _finetune(pretrained, folder, out, "--batch-size", "4", "--max-steps", "2", "--precision", "fp16") == 0
    ckpt = safe_load(out / "last.pt")
    assert ckpt["step"] == 2 and ckpt["scaler"]["scale"] >= 1.0  # an active scaler's state (a disabled one saves {})
    assert yaml.safe_load((out / "config.yaml").read_text())["precision"] == "fp16"


def test_clip_grad_clips_the_finetuning_gradient_as_the_originals_flag_does(tmp_path, pretrained, folder):
    # the original finetuning has --clip_grad; here a diverging finetune could only be told to lower --blr
    from helpers import applied_grad_norms

    out = tmp_path / "clipped"
    norms = applied_grad_norms(lambda: _finetune(pretrained, folder, out, "--batch-size", "4", "--max-steps", "2",
                                                 "--clip-grad", "0.001"))
    assert norms == pytest.approx([0.001, 0.001], rel=1e-3)
    assert yaml.safe_load((out / "config.yaml").read_text())["clip_grad"] == 0.001


@pytest.mark.parametrize("extra, words", [(["--min-lr", "0.5"], "--min-lr 0.5 is above the peak lr 7.81e-06"),
                                          (["--blr", "1e-5"], "--min-lr 1e-06 is above the peak lr 1.56e-07")])
def test_a_min_lr_above_the_peak_lr_is_refused_before_a_step(capsys, extra, words):
    """As pretrain refuses it: the 'cosine' would rise from the peak to --min-lr (--min-lr 0.5 diverged at the first
    steps past the warm-up, with the advice to lower --blr)."""
    assert main(["finetune", "--batch-size", "4", *extra, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert words in err and "lower --min-lr or raise --blr" in err and err.count("\n") == 1
    assert main(["finetune", "--batch-size", "4", "--blr", "1e-5", "--min-lr", "0", "--print-config"]) == 0
