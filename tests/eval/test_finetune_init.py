"""What a finetune starts from: which rows of a saved classifier head are kept (same classes, order, pooling, names),
an MAE checkpoint's position table interpolated, and the layer-decay groups."""

import re

import numpy as np
import pytest
import torch
from downstream_models import VIT, _checkpoint
from PIL import Image

from lomar import VisionTransformer, ViTConfig
from lomar.checkpoints.io import atomic_save, safe_load
from lomar.cli.app import main
from lomar.eval.features import load_pretrained_encoder
from lomar.train import finetune


def test_a_finetuned_head_is_kept_only_for_the_classes_it_was_trained_on(tmp_path, capsys):
    """Row i of a head is its i-th class: a finetuned head over as many classes under other names starts afresh (the
    encoder and fc_norm kept), as --resume refuses other classes; the same classes, or none named, keep it."""
    torch.manual_seed(0)
    classifier = VisionTransformer(ViTConfig(**VIT), num_classes=3)
    atomic_save({"model": classifier.state_dict(), "config": classifier.config.to_dict(), "num_classes": 3,
                 "classes": ["cat", "dog", "owl"], "format": "lomar-finetune-1", "global_pool": "avg"},
                tmp_path / "best.pt")
    for classes in (["cat", "dog", "owl"], None):
        kept = load_pretrained_encoder(tmp_path / "best.pt", num_classes=3, classes=classes)
        assert torch.equal(kept.head.weight, classifier.head.weight) and kept.load_report.fresh == []
    other = load_pretrained_encoder(tmp_path / "best.pt", num_classes=3, classes=["ant", "bee", "cat"])
    assert not torch.equal(other.head.weight, classifier.head.weight)
    assert torch.equal(other.fc_norm.weight, classifier.fc_norm.weight)
    assert torch.equal(other.blocks[0].attn.qkv.weight, classifier.blocks[0].attn.qkv.weight)
    assert other.load_report.fresh == ["head.weight", "head.bias"]
    assert "trained on other classes (3, e.g. 'dog' is not one of the data's)" in other.load_report.summary()
    # lomar finetune names its classes: a run over other class folders starts its head afresh, and says so
    data = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("ant", "bee", "cat"):
            (data / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(data / split / name / f"{i}.png")
    assert main(["finetune", "--pretrained", str(tmp_path / "best.pt"), "--data", str(data), "--img-size", "32",
                 "--batch-size", "6", "--max-steps", "1", "--workers", "0", "--device", "cpu", "--aa", "none",
                 "--out", str(tmp_path / "ft")]) == 0
    assert "so the head is initialised afresh" in capsys.readouterr().out


def test_a_finetuned_head_over_the_same_classes_in_another_order_keeps_its_rows_in_the_datas_order(tmp_path):
    """--eval-only's rule for a new finetuning from a classifier: a head saved over ['dog', 'owl', 'cat'] continued on
    folders that sort them ['cat', 'dog', 'owl'] keeps its rows (and biases), each moved to its class's index, so
    every image scores each class as the checkpoint's model did; the note says so."""
    torch.manual_seed(0)
    classifier = VisionTransformer(ViTConfig(**VIT), num_classes=3).eval()
    torch.nn.init.normal_(classifier.head.bias)  # rows told apart by their biases too
    atomic_save({"model": classifier.state_dict(), "config": classifier.config.to_dict(), "num_classes": 3,
                 "classes": ["dog", "owl", "cat"], "format": "lomar-finetune-1", "global_pool": "avg"},
                tmp_path / "best.pt")
    model = load_pretrained_encoder(tmp_path / "best.pt", num_classes=3, classes=["cat", "dog", "owl"]).eval()
    assert model.load_report.fresh == []
    assert "its head's rows put in the data's class order (the same 3 classes, saved in another order)" in (
        model.load_report.summary())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), classifier(images)[:, [2, 0, 1]])


def test_a_finetuned_head_is_kept_only_for_the_pooling_it_was_trained_on(tmp_path):
    """A head learnt on averaged tokens (through fc_norm) scores the normed cls token otherwise, and the other way
    round: --global-pool other than the checkpoint's starts the head afresh and says so, as read_export does for
    another pooling; the same pooling keeps it."""
    torch.manual_seed(0)
    for pool, other in (("avg", "cls"), ("cls", "avg")):
        classifier = VisionTransformer(ViTConfig(**VIT), num_classes=3, global_pool=pool)
        atomic_save({"model": classifier.state_dict(), "config": classifier.config.to_dict(), "num_classes": 3,
                     "classes": ["cat", "dog", "owl"], "format": "lomar-finetune-1", "global_pool": pool},
                    tmp_path / f"{pool}.pt")
        kept = load_pretrained_encoder(tmp_path / f"{pool}.pt", num_classes=3, global_pool=pool,
                                       classes=["cat", "dog", "owl"])
        assert torch.equal(kept.head.weight, classifier.head.weight) and kept.load_report.notes == []
        fresh = load_pretrained_encoder(tmp_path / f"{pool}.pt", num_classes=3, global_pool=other)
        assert not torch.equal(fresh.head.weight, classifier.head.weight)
        assert {"head.weight", "head.bias"} <= set(fresh.load_report.fresh)
        assert (f"its head pooled by --global-pool {pool}, not {other}, so the head is initialised afresh "
                f"(--global-pool {pool} keeps it)") in fresh.load_report.summary({"global_pool": "--global-pool"})


def test_a_classifiers_saved_class_names_that_cannot_be_its_rows_are_refused_in_one_line(tmp_path):
    """A hand-made checkpoint's classes (a name that is a list, a string, a name twice) name no rows: a ValueError
    naming the file, which lomar finetune says as a usage error, not a TypeError's traceback or a silently kept
    head."""
    classifier = VisionTransformer(ViTConfig(**VIT), num_classes=3)
    for names, words in (([["owl"], "cat", "dog"], "must be a list of class names"), ("owl", "got 'owl'"),
                         (["cat", "cat", "dog"], "name 'cat' twice")):
        atomic_save({"model": classifier.state_dict(), "config": classifier.config.to_dict(), "num_classes": 3,
                     "classes": names, "format": "lomar-finetune-1", "global_pool": "avg"}, tmp_path / "best.pt")
        with pytest.raises(ValueError, match=rf"best.pt: its classes .*{re.escape(words)}"):
            load_pretrained_encoder(tmp_path / "best.pt", num_classes=3, classes=["cat", "dog", "owl"])
        assert load_pretrained_encoder(tmp_path / "best.pt").num_classes == 0  # an encoder of it needs no names


def test_a_head_over_the_same_names_in_another_unicode_form_says_so(tmp_path):
    """Saved on macOS ('cafe' + a combining accent) and read on Linux (one accented letter): the two print alike,
    so the note that drops the head names them in ASCII and the rename that would keep it."""
    classifier = VisionTransformer(ViTConfig(**VIT), num_classes=2)
    atomic_save({"model": classifier.state_dict(), "config": classifier.config.to_dict(), "num_classes": 2,
                 "classes": ["cafe\u0301", "dog"], "format": "lomar-finetune-1", "global_pool": "avg"},
                tmp_path / "best.pt")
    model = load_pretrained_encoder(tmp_path / "best.pt", num_classes=2, classes=["caf\xe9", "dog"])
    assert model.load_report.fresh == ["head.weight", "head.bias"]
    assert "('cafe\\u0301' and 'caf\\xe9' are one name in two Unicode forms" in model.load_report.summary()


def test_load_mae_checkpoints_and_interpolate_position(tmp_path):
    path = _checkpoint(tmp_path / "mae.pt", "mae")
    encoder = load_pretrained_encoder(path)
    assert encoder.load_report.source == "pretrain checkpoint (mae)"
    assert any(k.startswith("decoder") for k in encoder.load_report.dropped)
    x = torch.randn(1, 3, 32, 32)
    original = tmp_path / "mae_orig.pth"
    state = {k.removeprefix("encoder."): v for k, v in safe_load(path)["model"].items()}
    torch.save({"model": state}, original)
    torch.testing.assert_close(load_pretrained_encoder(original, num_heads=2).forward_features(x),
                               encoder.forward_features(x))
    bigger = load_pretrained_encoder(path, img_size=48)
    assert bigger.pos_embed.shape == (1, 1 + 36, 32) and "interpolated" in bigger.load_report.summary()
    # the same table the encoder would interpolate on the fly for a 6x6 grid
    torch.testing.assert_close(bigger.pos_embed, encoder.pos_embed_for((6, 6)))


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_layer_decay_groups_follow_depth(pool):
    from timm.optim import param_groups_layer_decay

    model = VisionTransformer(ViTConfig(**VIT), num_classes=3, global_pool=pool)
    groups = param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = VIT["depth"]
    assert scale[id(named["patch_embed.proj.weight"])] == 0.5 ** (depth + 1)
    assert scale[id(named["cls_token"])] == 0.5 ** (depth + 1)
    for i in range(depth):
        assert scale[id(named[f"blocks.{i}.attn.qkv.weight"])] == 0.5 ** (depth - i)
    top = ("fc_norm.weight", "head.weight") if pool == "avg" else ("norm.weight", "norm.bias", "head.weight")
    assert not any(name.startswith("norm." if pool == "avg" else "fc_norm.") for name in named)
    for name in top:  # the top layer, as MAE's get_layer_id_for_vit
        assert scale[id(named[name])] == 1.0, name
    assert decay[id(named["cls_token"])] == 0 and decay[id(named["blocks.0.norm1.bias"])] == 0
    assert decay[id(named["blocks.0.attn.rpe.table"])] == 0.05 and decay[id(named["head.weight"])] == 0.05


def test_a_trained_absolute_position_table_is_in_the_stem_and_not_decayed():
    # MAE's finetuning: get_layer_id_for_vit puts pos_embed in layer 0 with cls_token, no_weight_decay skips both
    from types import SimpleNamespace

    model = VisionTransformer(ViTConfig(**VIT, pos="abs"), num_classes=3)
    config = SimpleNamespace(decay_rel_pos_bias=True, weight_decay=0.05, layer_decay=0.5)
    groups = finetune.FinetuneTask.param_groups(SimpleNamespace(model=model, config=config))
    (group,) = [g for g in groups if any(p is model.pos_embed for p in g["params"])]
    assert group["lr_scale"] == 0.5 ** (VIT["depth"] + 1) and group["weight_decay"] == 0.0
