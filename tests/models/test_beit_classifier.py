"""BEiTClassifier is timm's Beit as a finetune of a BEiT encoder builds it: for each option that changes the model
(layer scale, relative or absolute positions, pooling, drop path, another image size, the head's rows) the same
modules, the same initial weights from the same seed and the same forward pass, and its model spec rebuilds it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from timm.models.beit import Beit

from lomar.models.beit import BEiTConfig, timm_beit_args, timm_global_pool
from lomar.models.beit_classifier import BEiTClassifier
from lomar.models.spec import build_from_spec, model_spec

_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, vocab_size=8)


@pytest.mark.parametrize("pretraining, img_size, drop_path, classes, pool", [
    (dict(), None, 0.1, 3, "avg"),  # BEiT's recipe: shared table into every block, layer scale
    (dict(init_values=None, use_shared_rel_pos_bias=False, use_rel_pos_bias=True), 48, 0.0, 2, "cls"),
    (dict(init_values=0.0, use_shared_rel_pos_bias=False, use_abs_pos_emb=True), None, 0.2, 5, "avg"),
    (dict(use_abs_pos_emb=True), 48, 0.0, 0, "avg"),  # an encoder for knn / linprobe: no head, its final norm kept
])
def test_the_classifier_is_timms_beit_as_finetune_builds_it(pretraining, img_size, drop_path, classes, pool):
    config = BEiTConfig(**_TINY, **pretraining)
    timm_args = dict(timm_beit_args(config), num_classes=classes, global_pool=timm_global_pool(pool, classes),
                     drop_path_rate=drop_path, img_size=img_size or config.img_size)
    torch.manual_seed(0)
    expected = Beit(**timm_args)
    torch.manual_seed(0)
    built = BEiTClassifier(replace(config, img_size=timm_args["img_size"], drop_path_rate=drop_path), classes,
                           timm_global_pool(pool, classes))
    assert repr(built).removeprefix("BEiTClassifier") == repr(expected).removeprefix("Beit")
    state = expected.state_dict()
    assert built.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in built.state_dict().items())
    rebuilt = build_from_spec(model_spec(built))
    rebuilt.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, timm_args["img_size"], timm_args["img_size"], generator=torch.Generator().manual_seed(1))
    outputs = []
    for model in (expected, built, rebuilt):  # in training: drop path draws alike
        torch.manual_seed(2)
        outputs.append(model.train()(images))
    assert outputs[0].shape == (2, classes or config.embed_dim)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_a_pooling_timm_does_not_have_is_refused_naming_its_two():
    with pytest.raises(ValueError, match=r"global_pool='cls': timm's Beit pools by 'avg' or 'token'"):
        BEiTClassifier(BEiTConfig(**_TINY), 2, "cls")


def test_a_beit_of_another_norm_eps_is_refused_where_timms_beit_would_normalise_with_1e_6():
    config = BEiTConfig(**_TINY, norm_eps=1e-5)
    for build in (timm_beit_args, BEiTClassifier):
        with pytest.raises(ValueError, match=r"eps 1e-6, not this BEiT's norm_eps=1e-05"):
            build(config)
    assert timm_beit_args(BEiTConfig(**_TINY))["embed_dim"] == 32  # the default eps is timm's
