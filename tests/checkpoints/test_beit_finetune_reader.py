"""A `lomar finetune` checkpoint of a BEiT encoder saved before model specs keeps the BEiTConfig it was finetuned as,
its head and its pooling, which rebuild timm's Beit exactly, whatever its options; its own size is the one it
takes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lomar.checkpoints.formats import load_model
from lomar.checkpoints.kinds import FINETUNE_FORMAT
from lomar.models.beit import BEiTConfig, timm_global_pool
from lomar.models.beit_classifier import BEiTClassifier


@pytest.mark.parametrize("pool, pretraining, pool_saved", [
    ("avg", dict(), True),
    ("cls", dict(init_values=None, use_shared_rel_pos_bias=False, use_rel_pos_bias=True), True),
    ("cls", dict(use_shared_rel_pos_bias=False, use_abs_pos_emb=True), False),  # told by its fc_norm, or none
    ("avg", dict(init_values=0.0), False),
])
def test_one_saved_before_specs_is_rebuilt_from_its_config_head_and_pooling(tmp_path, pool, pretraining, pool_saved):
    config = BEiTConfig(img_size=48, patch_size=8, embed_dim=32, depth=2, num_heads=2, vocab_size=8,
                        drop_path_rate=0.2, **pretraining)
    torch.manual_seed(0)
    trained = BEiTClassifier(config, 3, timm_global_pool(pool, 3))
    with torch.no_grad():  # a trained head: timm starts it near zero
        trained.head.weight.normal_()
    older = {"model": trained.state_dict(), "config": config.to_dict(), "num_classes": 3, "classes": ["a", "b", "c"],
             "format": FINETUNE_FORMAT, **({"global_pool": pool} if pool_saved else {})}
    torch.save(older, tmp_path / "older.pt")
    rebuilt = load_model(tmp_path / "older.pt")
    assert isinstance(rebuilt, BEiTClassifier) and rebuilt.config == replace(config, drop_path_rate=0.0)
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images), trained.eval()(images))
    with pytest.raises(ValueError, match=r"its relative position tables fix its image size\); drop img_size=32 "
                                         r"\(it saved 48\)"):
        load_model(tmp_path / "older.pt", img_size=32)
