"""What a run takes from the recipes, written out here independently: a pretraining run's model and optimizer
(SPEC §1.6, §4), and `lomar finetune`'s defaults, the original finetuning recipe (SPEC §3, the published ViT-B
command; not the script's defaults blr 1e-3, layer decay 0.75, 50 epochs, no mixup/cutmix)."""

from __future__ import annotations

import pytest
import torch
import yaml

from helpers import pretrain
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.train.finetune import FinetuneTask

SPEC_3 = dict(blr=5e-4, layer_decay=0.65, weight_decay=0.05, drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1,
              reprob=0.25, aa="rand-m9-mstd0.5-inc1", epochs=100, warmup_epochs=5, min_lr=1e-6, global_pool="avg",
              crop_scale=[0.08, 1.0], accum_steps=1)


def test_a_lomar_encoder_is_finetuned_with_the_original_recipe(pretrained, labelled_folder, tmp_path, capsys):
    assert main(["finetune", "--pretrained", str(pretrained), "--data", str(labelled_folder), "--out",
                 str(tmp_path / "ft"), "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    for key, value in SPEC_3.items():
        assert resolved[key] == value, key
    assert resolved["clip_grad"] is None and "lr" not in resolved  # no clipping; lr = blr x effective batch / 256
    assert FinetuneTask.betas == (0.9, 0.999)  # AdamW with torch's default betas


def test_a_lomar_pretraining_run_has_no_drop_path_and_the_recipes_optimizer(pretrained):
    # SPEC §1.6: no dropout in pretraining; §4: AdamW (0.9, 0.95), wd 0.05 on all but biases and 1-D parameters
    ckpt = safe_load(pretrained)
    assert ckpt["model_spec"]["config"]["drop_path"] == 0.0
    groups = ckpt["optimizer"]["param_groups"]
    assert {g["betas"] for g in groups} == {(0.9, 0.95)} and {g["eps"] for g in groups} == {1e-8}
    decay = {g["weight_decay"]: len(g["params"]) for g in groups}
    state = ckpt["model"]
    one_d = sum(v.ndim == 1 for k, v in state.items())  # the biases are 1-D too
    assert decay == {0.0: one_d, 0.05: len(state) - one_d}


def test_beit_clips_at_3_with_betas_0_9_0_999_and_lomar_does_not_clip(image_dir, tmp_path, monkeypatch, no_run_figures):
    # BEIT_SPEC §4: AdamW (0.9, 0.999), gradient norm clipped to 3.0; SPEC §4: LoMaR never clips
    clipped = []
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, *a, **k: (
        clipped.append(max_norm), original(params, max_norm, *a, **k))[1])
    assert pretrain("--data", str(image_dir), "--out", str(tmp_path / "beit"), "--method", "beit",
                    "--max-steps", "2") == 0
    assert clipped == [3.0, 3.0]
    groups = safe_load(tmp_path / "beit" / "last.pt")["optimizer"]["param_groups"]
    assert {g["betas"] for g in groups} == {(0.9, 0.999)} and {g["eps"] for g in groups} == {1e-8}
    clipped.clear()
    assert pretrain("--data", str(image_dir), "--out", str(tmp_path / "lomar"), "--max-steps", "1") == 0
    assert clipped == []


def test_finetuning_drops_paths_at_rates_rising_to_0_1_over_the_blocks(pretrained):
    # SPEC §3: drop path 0.1, as MAE's finetuning builds it: linspace(0, 0.1, depth), the first block none
    from lomar.eval.features import load_pretrained_encoder  # the downstream loader sits beside the training layer

    model = load_pretrained_encoder(pretrained, num_classes=3, drop_path=0.1)
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in model.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, len(model.blocks)).tolist())
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)


def _scales(groups: list[dict], model) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}


def test_a_cls_pooling_beit_classifier_trains_its_final_norm_at_the_top_layers_lr():
    # BEiT's (and MAE's) layer ids put every parameter outside the stem and the blocks in the top layer; timm's Beit
    # matcher joins the final norm to the last block. BEiT's groups (the default) follow BEiT; timm's (as runs saved
    # before 2026-12-05 resume) keep timm's grouping
    from types import SimpleNamespace

    from timm.models.beit import Beit

    model = Beit(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=3, global_pool="token",
                 use_rel_pos_bias=True, init_values=0.1)
    config = SimpleNamespace(decay_rel_pos_bias=True, weight_decay=0.05, layer_decay=0.5)
    scale = _scales(FinetuneTask.param_groups(SimpleNamespace(model=model, config=config)), model)
    assert scale["norm.weight"] == scale["norm.bias"] == scale["head.weight"] == 1.0
    assert scale["blocks.2.attn.qkv.weight"] == 0.5 and scale["blocks.0.attn.qkv.weight"] == 0.5 ** 3
    assert scale["cls_token"] == scale["patch_embed.proj.weight"] == 0.5 ** 4
    groups = FinetuneTask.param_groups(SimpleNamespace(model=model, config=config))
    decay = {name: g["weight_decay"] for g in groups for name, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert decay["cls_token"] == 0.0 and decay["blocks.0.attn.relative_position_bias_table"] == 0.05  # BEiT's rule
    timm_groups = SimpleNamespace(model=model, config=SimpleNamespace(**{**vars(config), "decay_rel_pos_bias": False}))
    assert _scales(FinetuneTask.param_groups(timm_groups), model)["norm.weight"] == 0.5


def test_the_recipes_mixup_cutmix_and_label_smoothing_reach_the_loss(pretrained, labelled_folder):
    # SPEC §3: mixup 0.8 and cutmix 1.0 (MAE's timm Mixup: every batch, switching half the time), label smoothing 0.1
    # applied inside it and a soft-target cross-entropy; with both alphas 0, label smoothing alone
    from dataclasses import replace

    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from lomar.train.distributed import DistInfo
    from lomar.train.finetune_config import FinetuneConfig

    config = FinetuneConfig(pretrained=str(pretrained), data=str(labelled_folder), img_size=32, workers=0)
    task = FinetuneTask(config, DistInfo(), torch.device("cpu"))
    mix = task.mixup
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.label_smoothing) == (0.8, 1.0, 0.1)
    assert (mix.mix_prob, mix.switch_prob, mix.mode, mix.num_classes) == (1.0, 0.5, "batch", 2)
    assert isinstance(task.criterion, SoftTargetCrossEntropy)
    plain = FinetuneTask(replace(config, mixup=0.0, cutmix=0.0), DistInfo(), torch.device("cpu"))
    assert plain.mixup is None
    assert isinstance(plain.criterion, LabelSmoothingCrossEntropy) and plain.criterion.smoothing == 0.1


def test_the_finetune_transforms_resize_bicubically_and_erase_with_random_pixels():
    # SPEC §3 (MAE's build_dataset): timm's training transform, bicubic, random erasing 0.25 in 'pixel' mode, one
    # erasing; evaluation resizes bicubically (to size / 0.875 at 224 px) before the centre crop
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms import InterpolationMode, Resize

    from lomar.data.classify import classification_transforms

    train, val = classification_transforms(224, SPEC_3["aa"], SPEC_3["reprob"])
    (crop,) = [t for t in train.transforms if isinstance(t, RandomResizedCropAndInterpolation)]
    (erase,) = [t for t in train.transforms if isinstance(t, RandomErasing)]
    assert crop.interpolation == InterpolationMode.BICUBIC
    assert (erase.probability, erase.mode, erase.min_count, erase.max_count) == (0.25, "pixel", 1, 1)
    (resize,) = [t for t in val.transforms if isinstance(t, Resize)]
    assert resize.interpolation == InterpolationMode.BICUBIC and resize.size == 256


def test_the_peak_lr_scales_blr_by_the_effective_batch_and_an_absolute_lr_by_nothing():
    # SPEC §3-4: lr = blr x effective batch / 256, the effective batch counting accumulation and every process;
    # BEIT_SPEC §4: BEiT's lr (1.5e-3 at 2048 images) is not scaled by the batch
    from types import SimpleNamespace

    from lomar.lr_schedule import peak_lr

    mae = SimpleNamespace(lr=None, blr=1.5e-4, batch_size=64, accum_steps=2)
    assert peak_lr(mae, world_size=32) == pytest.approx(1.5e-4 * 4096 / 256)  # MAE's 4096-image recipe: 2.4e-3
    assert peak_lr(SimpleNamespace(lr=1.5e-3, blr=1.5e-4, batch_size=64, accum_steps=2), world_size=32) == 1.5e-3
