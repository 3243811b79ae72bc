"""lomar segment's model and scores without a run: UperNet's shapes and feature indices, layer decay, the loss as
mmseg averages it, the metrics against torchmetrics, and sliding-window against whole-image evaluation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from segment_cli import _segment

from lomar.eval.segmentation import confusion_matrix, predict_logits, segmentation_metrics
from lomar.integrations.segmenter import layer_decay_groups
from lomar.models.backbones import spread_indices
from lomar.models.segmenter import UperNetSegmenter, segmentation_losses
from lomar.models.upernet import UPerHead
from lomar.models.vit import VisionTransformer, ViTConfig


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
    # a whole epoch: its evaluation is a best.pt candidate, a None score compared with a float there
    assert _segment(data, out, "--model", "vit_tiny_patch16", "--epochs", "1") == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == 0 and records[-1]["mIoU"] is None and records[-1]["aAcc"] is None
    printed = capsys.readouterr().out
    assert "no metric defined: the validation split held nothing to score" in printed
    assert "no best.pt: no full epoch scored a mIoU yet" in printed  # not that no epoch was evaluated
