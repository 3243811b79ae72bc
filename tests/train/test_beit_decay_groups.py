"""BEiT pretraining's weight-decay groups (BEIT_SPEC's weight decay row): no decay for 1-D tensors, biases, pos_embed
or cls_token, the model's own ``no_weight_decay`` names included; mask_token and the rel-pos tables decayed."""

from __future__ import annotations

import torch

from lomar.models.beit import BEiTConfig
from lomar.models.beit_pretrain import BEiTPretrain
from lomar.tokenizers import KMeansTokenizer
from lomar.train.schedule import param_groups


def test_beit_pretraining_keeps_its_cls_token_undecayed_and_decays_its_mask_token_and_tables():
    config = BEiTConfig(img_size=48, patch_size=8, embed_dim=32, depth=1, num_heads=2, vocab_size=16,
                        drop_path_rate=0.0)
    tokenizer = KMeansTokenizer(torch.randn(16, 3 * 8 * 8, generator=torch.Generator().manual_seed(0)), patch=8,
                                input_size=48)
    model = BEiTPretrain(config, tokenizer, num_windows=0)
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped, decayed = ({names[id(p)] for p in group["params"]} for group in (no_decay, decay))
    assert "beit.cls_token" in skipped and model.get_parameter("beit.cls_token").ndim == 3
    assert {"beit.mask_token", "beit.rel_pos_bias.relative_position_bias_table"} <= decayed
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)
