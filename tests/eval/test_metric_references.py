"""The downstream tasks' scores against reference implementations written out here or taken from a library: finetune's
top-1/top-5 against torchmetrics, the k-NN classifier against DINO's ``knn_classifier`` (eval_knn.py), COCO AP on
hand-counted partial overlaps, and the linear probe fitting separable features."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lomar.data.coco import read_coco
from lomar.eval.coco import coco_metrics
from lomar.eval.knn import knn_top1
from lomar.eval.linear_probe import train_linear_probe
from lomar.train.distributed import DistInfo
from lomar.train.finetune import FinetuneTask


def _dino_knn_top1(train_x, train_y, val_x, val_y, k, temperature, classes):
    """DINO's eval_knn.knn_classifier, as published (one block of queries): cosine similarities, the top k,
    exp(sim / T) weights summed per class, argmax."""
    train_x, val_x = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    distances, indices = (val_x @ train_x.T).topk(k, largest=True, sorted=True)
    retrieved = train_y.view(1, -1).expand(len(val_x), -1).gather(1, indices)
    one_hot = torch.zeros(len(val_x) * k, classes).scatter_(1, retrieved.reshape(-1, 1), 1)
    weights = distances.clone().div_(temperature).exp_()
    probs = (one_hot.view(len(val_x), -1, classes) * weights.view(len(val_x), -1, 1)).sum(1)
    return int((probs.argmax(1) == val_y).sum()) / len(val_y)  # its top1 * 100.0 / total, a count over the queries


@pytest.mark.parametrize("k, temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (20, 0.5), (200, 0.1)])
def test_knn_top1_is_dinos(k, temperature):
    gen = torch.Generator().manual_seed(k)
    centres = torch.randn(5, 16, generator=gen)
    train_y, val_y = torch.randint(0, 5, (120,), generator=gen), torch.randint(0, 5, (60,), generator=gen)
    train_x = centres[train_y] + 1.5 * torch.randn(120, 16, generator=gen)  # overlapping: neither 0 nor 1
    val_x = centres[val_y] + 1.5 * torch.randn(60, 16, generator=gen)
    ours = knn_top1(train_x, train_y, val_x, val_y, k=k, temperature=temperature)
    assert ours == _dino_knn_top1(train_x, train_y, val_x, val_y, min(k, 120), temperature, 5)
    assert 0.3 < ours < 1.0


def test_knn_votes_are_weighted_not_counted():
    # one neighbour of class 0 at cosine 1 against two of class 1 at cosine 0.8: exp(1/0.07) > 2 exp(0.8/0.07), so
    # the weighted vote says 0 where a majority vote would say 1; at T = 1 the two outweigh the one
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels, query = torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]])
    assert knn_top1(bank, labels, query, torch.tensor([0]), k=3, temperature=0.07) == 1.0
    assert knn_top1(bank, labels, query, torch.tensor([1]), k=3, temperature=1.0) == 1.0


class _Logits(torch.nn.Module):
    """A 'classifier' whose logits for image i are row i of a fixed table (the image holds its index)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.table[images[:, 0, 0, 0].long()]


class _Split(list):
    """The validation split FinetuneTask.evaluate reads: its length and root."""

    def __init__(self, size: int, root):
        super().__init__(range(size))
        self.root = root


class _Loader:
    """The validation loader FinetuneTask.evaluate reads: its batches, and its dataset's split."""

    def __init__(self, batches, split: _Split):
        self.batches, self.dataset = batches, SimpleNamespace(dataset=split)

    def __iter__(self):
        return iter(self.batches)


def _finetune_scores(logits: torch.Tensor, targets: torch.Tensor, batch: int, root) -> dict:
    images = torch.arange(len(targets)).float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    batches = [(images[i:i + batch], targets[i:i + batch]) for i in range(0, len(targets), batch)]
    task = SimpleNamespace(model=_Logits(logits), device=torch.device("cpu"), info=DistInfo(), train_loader=None,
                           small_counted=True,  # images under the resize: none here (lomar.data.small_images)
                           classes=[str(c) for c in range(logits.shape[1])], autocast=lambda: torch.autocast("cpu",
                           enabled=False), val_loader=_Loader(batches, _Split(len(targets), root)))
    return FinetuneTask.evaluate(task)


@pytest.mark.parametrize("classes, batch", [(10, 7), (6, 50), (3, 4)])
def test_finetune_top1_and_top5_are_torchmetrics(classes, batch, tmp_path):
    from torchmetrics.classification import MulticlassAccuracy

    gen = torch.Generator().manual_seed(classes)
    targets = torch.randint(0, classes, (50,), generator=gen)
    logits = torch.randn(50, classes, generator=gen) + 1.5 * F.one_hot(targets, classes)
    scores = _finetune_scores(logits, targets, batch, tmp_path)
    top1 = MulticlassAccuracy(classes, top_k=1, average="micro")(logits, targets)
    assert scores["top1"] == pytest.approx(float(top1), abs=1e-6) and 0.2 < scores["top1"] < 1
    if classes > 5:
        top5 = MulticlassAccuracy(classes, top_k=5, average="micro")(logits, targets)
        assert scores["top5"] == pytest.approx(float(top5), abs=1e-6) and scores["top5"] > scores["top1"]
    else:  # every class is in the top 5: 1 whatever the model
        assert "top5" not in scores
    perfect = _finetune_scores(F.one_hot(targets, classes).float(), targets, batch, tmp_path)
    assert perfect["top1"] == 1.0


def test_the_linear_probe_fits_separable_features():
    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 32, generator=gen)
    y = torch.arange(4).repeat(16)
    x = centres[y] + torch.randn(64, 32, generator=gen)
    _, accuracy = train_linear_probe(x, y, x, y, epochs=5, batch_size=32)
    assert accuracy == 1.0


# ---- COCO AP on hand-counted cases


SIZE = 64


def _coco(tmp_path, annotations, images=(1, 2), categories=(1, 2)):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i in images:
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(folder / f"{i}.png")
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": SIZE, "height": SIZE} for i in images],
            "categories": [{"id": c, "name": str(c)} for c in categories], "annotations": []}
    for n, (image, category, (x, y, w, h)) in enumerate(annotations, 1):
        data["annotations"].append({"id": n, "image_id": image, "category_id": category, "bbox": [x, y, w, h],
                                    "area": w * h, "iscrowd": 0,
                                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return read_coco(path, folder).coco()


def _box(image, category, xywh, score=0.9):
    return {"image_id": image, "category_id": category, "bbox": list(map(float, xywh)), "score": score}


def test_partial_overlaps_count_at_the_iou_thresholds_they_pass(tmp_path):
    # ground truth 20 x 20 at (10, 10); the detection 20 x 15.5 at (10, 10): IoU 310 / 400 = 0.775 -> 6 of the 10
    # thresholds (0.5 .. 0.75); 20 x 16 shifted by 4 px: IoU 256 / 464 = 0.552 -> 2 of 10 (0.5, 0.55)
    gt = _coco(tmp_path, [(1, 1, (10, 10, 20, 20)), (2, 1, (10, 10, 20, 20))], categories=(1,))
    one = coco_metrics(gt, [_box(1, 1, (10, 10, 20, 15.5)), _box(2, 1, (10, 10, 20, 15.5))])
    assert one["box_AP"] == pytest.approx(60.0) and one["box_AP50"] == one["box_AP75"] == pytest.approx(100.0)
    shifted = coco_metrics(gt, [_box(1, 1, (14, 10, 20, 16)), _box(2, 1, (14, 10, 20, 16))])
    assert shifted["box_AP"] == pytest.approx(20.0) and shifted["box_AP75"] == 0.0
    # one of each: at 0.5 and 0.55 both match (AP 1), from 0.6 to 0.75 the better one alone: recall 1/2 at
    # precision 1 (the IoU-0.775 box scored higher), COCO's 101-point interpolation gives 51/101; above 0.775 none
    both = coco_metrics(gt, [_box(1, 1, (10, 10, 20, 15.5), 0.9), _box(2, 1, (14, 10, 20, 16), 0.8)])
    assert both["box_AP"] == pytest.approx(100 * (2 + 4 * 51 / 101) / 10)


def test_a_category_absent_from_the_ground_truth_is_left_out_of_the_mean(tmp_path):
    # category 2 has no ground truth anywhere: pycocotools leaves it out of the mean (its AP is undefined), so a
    # detection of it changes nothing; a second category with ground truth but no detection halves the AP
    gt = _coco(tmp_path, [(1, 1, (10, 10, 20, 20))])
    perfect = [_box(1, 1, (10, 10, 20, 20))]
    assert coco_metrics(gt, perfect)["box_AP"] == pytest.approx(100.0)
    assert coco_metrics(gt, perfect + [_box(2, 2, (30, 30, 20, 20), 0.99)])["box_AP"] == pytest.approx(100.0)
    (tmp_path / "both").mkdir()
    missed = _coco(tmp_path / "both", [(1, 1, (10, 10, 20, 20)), (2, 2, (30, 30, 20, 20))])
    assert coco_metrics(missed, perfect)["box_AP"] == pytest.approx(50.0)


@pytest.mark.parametrize("criterion", ["hard", "smoothed", "mixed"])
def test_the_finetune_loss_is_taken_in_float32_from_bf16_logits(criterion):
    # CPU autocast runs log_softmax in bf16 (CUDA's runs it in float32): timm's smoothed and soft-target losses,
    # which call it themselves, came out of a bf16 run rounded to bf16's 8 bits (a first loss of 1.3828125 = ln 4
    # rounded), their gradients as coarse; F.cross_entropy is autocast to float32 on both
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    images, targets = torch.randn(8, 3, 2, 2), torch.arange(8)
    if criterion == "mixed":  # mixup's and cutmix's targets: two smoothed one-hots mixed
        targets = 0.7 * F.one_hot(targets, 10) + 0.3 * F.one_hot(targets.flip(0), 10)
        targets = 0.9 * targets + 0.01
    losses = {"hard": torch.nn.CrossEntropyLoss(), "smoothed": LabelSmoothingCrossEntropy(0.1),
              "mixed": SoftTargetCrossEntropy()}
    task = SimpleNamespace(net=net, device=torch.device("cpu"), mixup=None, criterion=losses[criterion])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FinetuneTask.loss(task, (images, targets))
        logits = net(images)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, task.criterion(logits.float(), targets), rtol=1e-6, atol=1e-6)


# ---- layer-wise lr decay and weight decay against each recipe's own rule, parameter by parameter


def _mae_lrd(name: str, param, depth: int, decay: float, skip: set[str]) -> tuple[float, float]:
    """MAE's util/lr_decay.param_groups_lrd with get_layer_id_for_vit: (lr scale, weight decay 0.05 or 0)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        layer = 0
    elif name.startswith("blocks"):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = depth + 1
    return decay ** (depth + 1 - layer), 0.0 if param.ndim == 1 or name in skip else 0.05


def _mmseg_lrd(name: str, param, depth: int, decay: float) -> tuple[float, float]:
    """mmseg's LayerDecayOptimizerConstructor (BEiT / MAE configs) with get_num_layer_for_vit, the encoder's names
    as its backbone's (``backbone.`` + the name), what is not the encoder (pyramid, heads) at the top layer. Its
    no-decay test compares the full name with 'pos_embed' and 'cls_token', which a backbone's name never equals
    (so it decays them); lomar exempts them, as that test means to."""
    num_layers = depth + 2
    encoder = name.removeprefix("backbone.encoder.") if name.startswith("backbone.encoder.") else None
    if encoder in ("cls_token", "mask_token", "pos_embed") or (encoder or "").startswith("patch_embed"):
        layer = 0
    elif (encoder or "").startswith("blocks"):
        layer = int(encoder.split(".")[1]) + 1
    else:
        layer = num_layers - 1
    no_decay = param.ndim == 1 or name.endswith(".bias") or encoder in ("pos_embed", "cls_token")
    return decay ** (num_layers - layer - 1), 0.0 if no_decay else 0.05


def _detectron2_lrd(name: str, module_of, depth: int, decay: float) -> tuple[float, float]:
    """detectron2's get_vit_lr_decay_rate (ViTDet, num_layers = depth) and get_default_optimizer_params with
    weight_decay_norm 0 and pos_embed's override; lomar also exempts the cls token (ViTDet's ViT has none) and
    channel LayerNorms (detectron2's own LayerNorm class escapes its torch.nn.LayerNorm test: docs/dense.md)."""
    layer = depth + 1
    if name.startswith("backbone."):
        if ".pos_embed" in name or ".patch_embed" in name or name.endswith(".cls_token"):
            layer = 0
        elif ".blocks." in name:
            layer = int(name[name.find(".blocks."):].split(".")[2]) + 1
    norm = isinstance(module_of[name], (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d))
    no_decay = norm or name.endswith((".pos_embed", ".cls_token"))
    return decay ** (depth + 1 - layer), 0.0 if no_decay else 0.1


def _groups_by_name(groups: list[dict], model) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(by_name) == sum(len(g["params"]) for g in groups) == len(names)  # each trainable parameter once
    return by_name


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_finetune_groups_are_maes_param_groups_lrd(pool):
    from lomar.models.vit import VisionTransformer, ViTConfig

    model = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, pos="abs"),
                              num_classes=5, global_pool=pool)
    config = SimpleNamespace(decay_rel_pos_bias=False, weight_decay=0.05, layer_decay=0.65)
    ours = _groups_by_name(FinetuneTask.param_groups(SimpleNamespace(model=model, config=config)), model)
    # MAE's skip list, its model's no_weight_decay (timm 0.3.2's, which MAE pins), written out: the model's own
    # would make the reference follow lomar's list
    skip = {"pos_embed", "cls_token"}
    for name, param in model.named_parameters():
        assert ours[name] == pytest.approx(_mae_lrd(name, param, 3, 0.65, skip)), name


def test_segment_groups_are_mmsegs_layer_decay_constructor():
    from lomar.integrations.segmenter import layer_decay_groups
    from lomar.models.segmenter import UperNetSegmenter
    from lomar.models.vit import VisionTransformer, ViTConfig

    encoder = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, pos="abs"))
    model = UperNetSegmenter(encoder, num_classes=3, channels=8, aux_channels=8)
    ours = _groups_by_name(layer_decay_groups(model, lr=1e-4, weight_decay=0.05, layer_decay=0.65), model)
    for name, param in model.named_parameters():
        assert ours[name] == pytest.approx(_mmseg_lrd(name, param, 4, 0.65)), name


def test_detect_groups_are_detectron2s_vitdet_rule():
    from lomar.integrations.detection import detector_param_groups
    from lomar.models.mask_rcnn import ViTMaskRCNN
    from lomar.models.vit import VisionTransformer, model_config

    encoder = VisionTransformer(model_config("vit_tiny_patch16", img_size=64, depth=3, pos="abs"))
    model = ViTMaskRCNN(encoder, 2, 64)
    module_of = {f"{m}.{n}" if m else n: module for m, module in model.named_modules()
                 for n, _ in module.named_parameters(recurse=False)}
    ours = _groups_by_name(detector_param_groups(model, 0.1, 0.7), model)
    for name in module_of:
        assert ours[name] == pytest.approx(_detectron2_lrd(name, module_of, 3, 0.7)), name
