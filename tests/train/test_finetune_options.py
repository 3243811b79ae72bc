"""Finetuning options of the original recipe: evaluation crop ratio by size, gradient
accumulation (--accum-steps), the classifier's input (--global-pool cls|avg), and the training
crop's area range (--crop-scale), ViTDet-style windowed blocks (--window-size, --global-blocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import CenterCrop, Resize

from helpers import write_images
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.data.classify import classification_transforms, eval_crop_ratio
from lomar.eval.features import load_pretrained_encoder
from lomar.models.abs_pos import sincos_pos_embed_2d
from lomar.models.beit import BEiTConfig
from lomar.models.vit import VisionTransformer, ViTConfig
from lomar.train import finetune as finetune_module


@pytest.fixture(scope="module")
def folder(labelled_folder) -> Path:
    return labelled_folder


def _finetune(pretrained, folder, out, *extra) -> int:
    # no mixup, erasing, auto-augment, smoothing or drop path: only crops and flips are random
    return main(["finetune", "--pretrained", str(pretrained), "--data", str(folder), "--img-size", "32",
                 "--workers", "0", "--threads", "1", "--device", "cpu", "--log-every", "1", "--out", str(out),
                 "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "none", "--smoothing", "0",
                 "--drop-path", "0", "--precision", "fp32", *extra])


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
    """timm's augmentation draws from each worker's global streams, seeded once per worker: a resumed run's new
    workers started them over, so the rest of the epoch got other crops, ops and erasings (now seeded per sample)."""
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


def test_window_size_finetunes_vitdet_blocks_and_keeps_them(tmp_path, capsys, pretrained, folder):
    from lomar.checkpoints.formats import load_model
    from lomar.models.attention import vitdet_global_blocks

    out = tmp_path / "run"
    assert _finetune(pretrained, folder, out, "--batch-size", "4", "--max-steps", "1", "--window-size", "2",
                     "--global-blocks", "1", "--attention", "chunked") == 0
    model = load_model(out / "last.pt")
    assert (model.config.window_size, model.config.global_blocks) == (2, (1,))
    plain = load_pretrained_encoder(pretrained, num_classes=2)
    plain.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 48)
    model.eval(), plain.eval()
    with torch.no_grad():  # the windows are in use: not the global-attention model with these weights
        assert not torch.allclose(model.forward_features(images), plain.forward_features(images), atol=1e-3)
    # without --global-blocks: ViTDet's layout for the encoder's depth
    encoder = load_pretrained_encoder(pretrained, window_size=2, global_blocks=None)
    assert encoder.config.global_blocks == vitdet_global_blocks(encoder.config.depth)
    capsys.readouterr()
    assert main(["finetune", "--out", str(out), "--resume", "auto", "--window-size", "0"]) == 2  # the recipe's
    assert "--window-size 0 differs from 2" in capsys.readouterr().err


def test_a_window_size_that_windows_no_block_is_said(tmp_path, capsys, pretrained, folder):
    """ViTDet's default global blocks (the last of each quarter) are every block of an encoder under 8 blocks deep:
    --window-size then changed nothing, without a word."""
    encoder = load_pretrained_encoder(pretrained, window_size=2, global_blocks=None)
    # the library's words are the Python caller's parameters, the command's its flags
    assert "window_size=2 windows no block: all 2 blocks attend globally (global_blocks=(0, 1)); give fewer global " \
           "blocks (global_blocks=(1,)) to window the others" in encoder.load_report.summary()
    assert "windows no block" not in load_pretrained_encoder(pretrained, window_size=2, global_blocks=(1,)) \
        .load_report.summary()
    assert _finetune(pretrained, folder, tmp_path / "run", "--batch-size", "4", "--max-steps", "1",
                     "--window-size", "2") == 0
    assert "--window-size 2 windows no block: all 2 blocks attend globally (--global-blocks 0 1); give fewer global " \
           "blocks (--global-blocks 1) to window the others" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--global-blocks", "1"], "--global-blocks needs --window-size N > 0"),
    (["--window-size", "-1"], "--window-size must be >= 0"),
    (["--window-size", "2", "--global-blocks", "1", "1"], "distinct block indices"),
    (["--window-size", "2", "--global-blocks", "7"], "--global-blocks takes indices 0..1"),  # the encoder has 2 blocks
])
def test_bad_window_settings_are_one_line(tmp_path, capsys, pretrained, folder, flags, message):
    assert _finetune(pretrained, folder, tmp_path / "run", "--batch-size", "4", "--max-steps", "1", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_each_epoch_end_evaluation_names_the_epoch_it_evaluated(tmp_path, pretrained, folder):
    # step records and the evaluation after them carry the same 0-based epoch; `lomar study`
    # reads the last record's epoch (epochs - 1) to tell a finished finetune from a stopped one
    assert _finetune(pretrained, folder, tmp_path / "run", "--batch-size", "8", "--epochs", "2") == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "top1" in r]
    assert [r["epoch"] for r in evals] == [0, 1]
    for evaluation in evals:
        assert {r["epoch"] for r in records if "loss" in r and r["step"] <= evaluation["step"]} >= {evaluation["epoch"]}


def test_top5_is_reported_only_where_it_can_miss(tmp_path, pretrained):
    # over 2-5 classes every image is a top-5 hit: "top-5 100.00%" was printed as a score
    from helpers import write_images

    root = tmp_path / "six"
    for split in ("train", "val"):
        for label in "abcdef":
            write_images(root / split / label, 1, size=(36, 36))
    assert _finetune(pretrained, root, tmp_path / "run", "--batch-size", "6", "--max-steps", "1") == 0
    evaluation = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0 <= evaluation["top5"] <= 1 and evaluation["top1"] <= evaluation["top5"]


def test_mae_pretraining_keeps_the_position_table_and_finetuning_trains_it(tmp_path, image_dir, folder, monkeypatch):
    """MAE pretrains with a fixed sin-cos table; its finetuning (timm's ViT) trains the loaded table, at
    layer 0's lr scale and without weight decay."""
    from helpers import pretrain

    pre = tmp_path / "mae"
    assert pretrain("--data", str(image_dir), "--out", str(pre), "--method", "mae", "--windows", "0",
                    "--max-steps", "2", "--decoder-embed-dim", "16", "--decoder-depth", "1",
                    "--decoder-num-heads", "2") == 0
    table = sincos_pos_embed_2d(32, (4, 4))[None]
    torch.testing.assert_close(safe_load(pre / "last.pt")["model"]["encoder.pos_embed"], table, rtol=0, atol=0)
    groups = []
    original = finetune_module.FinetuneTask.param_groups
    monkeypatch.setattr(finetune_module.FinetuneTask, "param_groups",
                        lambda self: groups.extend(original(self)) or groups)
    assert _finetune(pre / "last.pt", folder, tmp_path / "ft", "--batch-size", "4", "--max-steps", "1",
                     "--layer-decay", "0.5", "--warmup-epochs", "0") == 0
    tuned = safe_load(tmp_path / "ft" / "last.pt")["model"]["pos_embed"]
    assert not torch.equal(tuned, table)
    (group,) = [g for g in groups if any(p.shape == table.shape for p in g["params"])]
    assert group["weight_decay"] == 0.0 and group["lr_scale"] == 0.5 ** 3  # stem of 2 blocks + head: 4 layers
    # read at another size (export --img-size, load_model), the trained table is resampled, not replaced
    from timm.layers import resample_abs_pos_embed

    from lomar.checkpoints.formats import load_model

    wider = load_model(tmp_path / "ft" / "last.pt", img_size=64)
    torch.testing.assert_close(wider.pos_embed.detach(), resample_abs_pos_embed(tuned, [8, 8], [4, 4],
                                                                                antialias=False))
    # and so is it where --eval-only scores the classifier at another size
    built, trained_classifier = [], finetune_module._trained_classifier
    monkeypatch.setattr(finetune_module, "_trained_classifier", lambda *a: built.append(trained_classifier(*a))
                        or built[-1])
    assert main(["finetune", "--eval-only", "--pretrained", str(tmp_path / "ft"), "--data", str(folder), "--img-size",
                 "64", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "at64")]) == 0
    torch.testing.assert_close(built[0][0].pos_embed.detach(), wider.pos_embed.detach(), rtol=0, atol=0)


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


def test_a_finetune_saved_before_the_table_was_trained_resumes_with_it_fixed(tmp_path, image_dir, folder):
    """A run of the previous version (no train_pos_embed setting, the table outside the optimizer) resumes."""
    from helpers import pretrain

    pre = tmp_path / "mae"
    assert pretrain("--data", str(image_dir), "--out", str(pre), "--method", "mae", "--windows", "0",
                    "--max-steps", "1", "--decoder-embed-dim", "16", "--decoder-depth", "1",
                    "--decoder-num-heads", "2") == 0
    out = tmp_path / "ft"
    assert _finetune(pre / "last.pt", folder, out, "--batch-size", "4", "--max-steps", "1", "--epochs", "2",
                     "--no-train-pos-embed") == 0
    ckpt = safe_load(out / "last.pt")
    del ckpt["settings"]["train_pos_embed"]
    torch.save(ckpt, out / "last.pt")
    assert main(["finetune", "--out", str(out), "--resume", "auto", "--max-steps", "2"]) == 0
    resumed = safe_load(out / "last.pt")
    assert resumed["step"] == 2 and resumed["settings"]["train_pos_embed"] is False
    assert torch.equal(resumed["model"]["pos_embed"], ckpt["model"]["pos_embed"])  # still fixed
    from timm.layers import resample_abs_pos_embed

    from lomar.checkpoints.formats import load_model

    wider = load_model(out / "last.pt", img_size=64)  # a fixed table at another size: resampled as a trained one
    fixed = sincos_pos_embed_2d(32, (4, 4))[None]
    assert torch.equal(ckpt["model"]["pos_embed"], fixed)
    torch.testing.assert_close(wider.pos_embed.detach(), resample_abs_pos_embed(fixed, [8, 8], [4, 4], antialias=False))


@pytest.mark.parametrize("extra, words", [(["--min-lr", "0.5"], "--min-lr 0.5 is above the peak lr 7.81e-06"),
                                          (["--blr", "1e-5"], "--min-lr 1e-06 is above the peak lr 1.56e-07")])
def test_a_min_lr_above_the_peak_lr_is_refused_before_a_step(capsys, extra, words):
    """As pretrain refuses it: the 'cosine' would rise from the peak to --min-lr (--min-lr 0.5 diverged at the first
    steps past the warm-up, with the advice to lower --blr)."""
    assert main(["finetune", "--batch-size", "4", *extra, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert words in err and "lower --min-lr or raise --blr" in err and err.count("\n") == 1
    assert main(["finetune", "--batch-size", "4", "--blr", "1e-5", "--min-lr", "0", "--print-config"]) == 0


def test_the_start_line_counts_the_split_and_this_process_share_of_it():
    """Under torchrun the train count was the whole split's but said '(this process)', beside val's real share."""
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
    model.config.depth = 1  # it said '1 blocks'
    assert "; ViT 32 wide, 1 block, 32 px, 0.0M params" in FinetuneTask.describe(stub)


def test_resuming_a_run_that_trained_a_thumbnail_class_says_why_it_cannot():
    """Runs before thumbnail caches stopped being classes hold '@eaDir' among their classes: the data did not
    change, so 'resume with the data it started with' would send the user looking for a change that is not theirs."""
    from types import SimpleNamespace

    from lomar.errors import UsageError
    from lomar.train.finetune import FinetuneTask

    stub = SimpleNamespace(classes=["cat", "dog"])
    with pytest.raises(UsageError, match=r"^--resume: the checkpoint has a class of thumbnails \(@eaDir\), which lomar "
                                         r"now leaves out of the class folders; its scores counted them: start a new "
                                         r"run$"):
        FinetuneTask.load(stub, {"classes": ["@eaDir", "cat", "dog"]})
    with pytest.raises(UsageError, match="only in the checkpoint: \\['owl'\\]"):
        FinetuneTask.load(stub, {"classes": ["cat", "dog", "owl"]})
    FinetuneTask.load(stub, {"classes": ["cat", "dog"]})


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


def test_eval_only_scores_a_finetuned_classifier_as_its_run_did(tmp_path, capsys, monkeypatch, pretrained):
    """--eval-only --pretrained RUN: its best.pt read once, its classes matched by name, its size unless --img-size,
    the run's final top-1/top-5 again; a contradicting setting or other class folders are refused in one line."""
    data = tmp_path / "data"
    for k, name in enumerate("abcdef"):  # six classes: top-5 is scored
        for split in ("train", "val"):
            write_images(data / split / name, 1, size=(36 + k, 36))
    run = tmp_path / "run"  # one step: an epoch of 6 images in batches of 4, then best.pt
    assert _finetune(pretrained, data, run, "--batch-size", "4", "--epochs", "1", "--global-pool", "cls") == 0
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"best top-1 {100 * final['top1']:.2f}% in {run / 'best.pt'}" in capsys.readouterr().out  # as epochs say
    evaluate = ["finetune", "--eval-only", "--val", str(data / "val"), "--workers", "0", "--threads", "1",
                "--device", "cpu", "--batch-size", "3"]
    capsys.readouterr()
    assert main([*evaluate, "--pretrained", str(run), "--print-config"]) == 0  # scored as its run scored
    assert yaml.safe_load(capsys.readouterr().out)["precision"] == "fp32"
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(f) or load(f, *a, **k))
    capsys.readouterr()
    assert main([*evaluate, "--pretrained", str(run), "--out", str(tmp_path / "scored")]) == 0
    assert reads == [run / "best.pt"]  # read once: the settings taken and the weights scored are of one read
    monkeypatch.undo()
    # what it scores, as a run's start-up line: on stdout with the score line (a study silences it)
    assert f"lomar finetune: classifier loaded from {run / 'best.pt'} (step 1), 32 px, 6 classes" in \
        capsys.readouterr().out
    scored = json.loads((tmp_path / "scored" / "metrics.jsonl").read_text())
    assert (scored["eval_only"], scored["checkpoint"], scored["step"]) == (True, str(run / "best.pt"), 1)
    assert (scored["top1"], scored["top5"]) == (final["top1"], final["top5"])
    assert scored["img_size"] == scored["trained_img_size"] == 32
    # its head's rows in another order than the folder's: each image still scored against its class's row
    ckpt = safe_load(run / "best.pt")
    order = [5, 0, 4, 1, 3, 2]
    ckpt["classes"] = [ckpt["classes"][i] for i in order]
    ckpt["model"].update({k: ckpt["model"][k][order] for k in ("head.weight", "head.bias")})
    torch.save(ckpt, tmp_path / "shuffled.pt")
    assert main([*evaluate, "--pretrained", str(tmp_path / "shuffled.pt"), "--out", str(tmp_path / "shuffled")]) == 0
    shuffled = json.loads((tmp_path / "shuffled" / "metrics.jsonl").read_text())
    assert (shuffled["top1"], shuffled["top5"]) == (final["top1"], final["top5"])
    ckpt["settings"]["decode"] = "draft"  # a run whose evaluations read draft JPEGs is scored on them again
    torch.save(ckpt, tmp_path / "draft.pt")
    assert main([*evaluate, "--pretrained", str(tmp_path / "draft.pt"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["decode"] == "draft"
    assert main([*evaluate, "--pretrained", str(tmp_path / "draft.pt"), "--print-config", "--decode", "full"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["decode"] == "full"
    # a run under --precision auto is scored in the precision auto chose for it (fp32), not this machine's auto's:
    # best.pt records it, as last.pt does
    ckpt["settings"]["precision"] = "auto"
    torch.save(ckpt, tmp_path / "auto.pt")
    for given, scored_in in (([], "fp32"), (["--precision", "auto"], "fp32"), (["--precision", "bf16"], "bf16")):
        assert main([*evaluate, "--pretrained", str(tmp_path / "auto.pt"), "--print-config", *given]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["precision"] == scored_in
    from lomar.train import precision  # where this machine's auto would pick bf16, the start says so

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert main([*evaluate, "--pretrained", str(tmp_path / "auto.pt"), "--out", str(tmp_path / "auto")]) == 0
    assert ("lomar finetune: note: precision fp32, the one the classifier trained in (this machine's --precision auto "
            "would pick bf16); pass --precision bf16 to switch\n") in capsys.readouterr().err
    monkeypatch.undo()
    # a classifier that records no precision (an older lomar's): this machine's auto is used, and the start says so
    del ckpt["precision"]
    torch.save(ckpt, tmp_path / "older.pt")
    assert main([*evaluate, "--pretrained", str(tmp_path / "older.pt"), "--out", str(tmp_path / "older")]) == 0
    here = precision.resolve_precision("auto", torch.device("cpu"))
    assert (f"lomar finetune: note: precision {here}, --precision auto's choice on this machine: the checkpoint does "
            f"not record the precision the classifier trained in\n") in capsys.readouterr().err
    # another size: its position table resampled there, the record says both sizes
    assert main([*evaluate, "--pretrained", str(run), "--out", str(tmp_path / "48"), "--img-size", "48"]) == 0
    assert "(step 1), 48 px, not its trained 32 px" in capsys.readouterr().out
    at48 = json.loads((tmp_path / "48" / "metrics.jsonl").read_text())
    assert (at48["img_size"], at48["trained_img_size"]) == (48, 32) and 0 <= at48["top1"] <= 1
    write_images(tmp_path / "other" / "a", 1)
    write_images(tmp_path / "other" / "zebra", 1)
    deeper = tmp_path / "deeper.pt"  # a saved config that is not its weights': named by the checkpoint reader
    torch.save({**ckpt, "config": {**ckpt["config"], "depth": 3}}, deeper)
    # a ViT's weights beside BEiT's config (embed_dim too) and a ViT's model spec: neither read as the other
    ckpt["config"] = BEiTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, vocab_size=8).to_dict()
    torch.save(ckpt, tmp_path / "beit.pt")
    log = (run / "metrics.jsonl").read_text()
    for flags, message in [
        (["--pretrained", str(tmp_path / "beit.pt")], f"--pretrained {tmp_path / 'beit.pt'}: its model_spec names "
                                                      f"'lomar.models.vit:VisionTransformer', not "
                                                      f"'lomar.models.beit_classifier:BEiTClassifier', though it is a "
                                                      f"finetuned BEiT classifier"),
        # the run's log is its training's: a resume cuts it back by step, a study reads its last top-1
        (["--out", str(run)], f"--out {run} holds a run, whose metrics.jsonl is its training's own"),
        (["--resume", str(run / "last.pt")], "continues no run; drop --resume"),  # --out: the run's folder else
        (["--global-pool", "avg"], f"--global-pool avg differs from the classifier's own (cls) in {run / 'best.pt'}; "
                                   f"drop --global-pool"),
        (["--val", str(tmp_path / "other")], f"the class folders of {tmp_path / 'other'} differ from the classifier's "
                                             f"in {run / 'best.pt'} (only in the classifier: ['b', 'c', 'd', 'e', "
                                             f"'f'], only in {tmp_path / 'other'}: ['zebra'])"),
        (["--pretrained", str(pretrained)], f"--pretrained {pretrained} is not a `lomar finetune` run or checkpoint"),
        (["--pretrained", str(deeper)], f"--pretrained {deeper}: its saved config does not describe its weights: "
                                        f"depth 3 (its weights: 2)"),
    ]:
        assert main([*evaluate, "--pretrained", str(run), "--out", str(tmp_path / "refused"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (run / "metrics.jsonl").read_text() == log


def test_an_encoder_flag_without_the_term_it_acts_on_is_noted(tmp_path, capsys, pretrained, labelled_folder):
    """--no-train-pos-embed on a LoMaR encoder (no absolute table), --no-decay-rel-pos-bias on one not BEiT's, went
    on without a word; --attention is read by its iRPE. Notes, not refusals: the run trains as without them."""
    assert _finetune(pretrained, labelled_folder, tmp_path / "run", "--batch-size", "4", "--max-steps", "1",
                     "--no-train-pos-embed", "--no-decay-rel-pos-bias", "--attention", "chunked") == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if ": note: " in line]
    assert notes == [
        "lomar finetune: note: --no-train-pos-embed is unused: it acts on an absolute position table (MAE's), and "
        "this encoder has none",
        "lomar finetune: note: --no-decay-rel-pos-bias is unused: it sets a BEiT encoder's finetuning groups, and "
        "this encoder is not BEiT's"]


def test_attention_on_an_encoder_without_a_relative_position_term_is_noted():
    from types import SimpleNamespace

    from lomar.models.vit import VisionTransformer, ViTConfig
    from lomar.train.encoder_settings import unused_encoder_flags

    mae = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, pos="abs"))
    given = SimpleNamespace(attention="dense", train_pos_embed=False, flags_given=frozenset({"attention"}))
    assert unused_encoder_flags(given, mae) == [
        "--attention dense is unused: it picks how lomar computes a relative position bias (iRPE, --rel-pos), and "
        "this encoder's attention has none"]
    # timm's BEiT has a relative position bias, its own: the note must not deny it one
    assert unused_encoder_flags(given, mae, beit=True) == [
        "--attention dense is unused: it picks how lomar computes a relative position bias (iRPE, --rel-pos), and "
        "timm's BEiT attention computes its own"]
    # the same values from a settings file, or a resumed run's own (an older detector's train_pos_embed false)
    assert unused_encoder_flags(SimpleNamespace(attention="dense", train_pos_embed=False), mae) == []
