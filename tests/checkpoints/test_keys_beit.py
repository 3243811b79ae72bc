"""What :mod:`lomar.checkpoints.keys_beit` infers from an original BEiT state dict's key names and shapes, the tables
it refuses to guess a grid from, and the keys it hands timm."""

import pytest
import torch

from lomar.checkpoints.io import atomic_save
from lomar.checkpoints.keys_beit import beit_from_original, beit_to_timm, holds_beit_keys, load_original_beit
from lomar.models.beit import BEiT, BEiTConfig

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, vocab_size=16, drop_path_rate=0.0)


def _shapes_only(rows: int = 7 * 7 + 3, **extra) -> dict[str, torch.Tensor]:
    """The keys beit_from_original reads, at a 1-channel, 24-wide, 3-block, 4x4 patch model's shapes (4 heads,
    a 4x4 grid's shared table of 7x7+3 rows, MLP ratio 2, a vocabulary of 10)."""
    state = {"patch_embed.proj.weight": torch.zeros(24, 1, 4, 4), "cls_token": torch.zeros(1, 1, 24),
             "mask_token": torch.zeros(1, 1, 24), "norm.weight": torch.zeros(24), "lm_head.weight": torch.zeros(10, 24),
             "rel_pos_bias.relative_position_bias_table": torch.zeros(rows, 4),
             "rel_pos_bias.relative_position_index": torch.zeros(17, 17, dtype=torch.long)}
    for i in range(3):
        state[f"blocks.{i}.attn.qkv.weight"] = torch.zeros(72, 24)
        state[f"blocks.{i}.mlp.fc1.weight"] = torch.zeros(48, 24)
    return {**state, **extra}


def test_the_config_is_read_off_the_key_names_and_shapes():
    info, state = beit_from_original({"model": _shapes_only()})
    assert info == dict(embed_dim=24, in_chans=1, patch_size=4, depth=3, mlp_ratio=2.0, qkv_bias=False,
                        init_values=None, use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_abs_pos_emb=False,
                        vocab_size=10, num_heads=4, img_size=16)
    assert set(state) == set(_shapes_only()) - {"rel_pos_bias.relative_position_index"}
    per_block = _shapes_only(**{"blocks.0.attn.q_bias": torch.zeros(24), "blocks.0.gamma_1": torch.zeros(24),
                                "pos_embed": torch.zeros(1, 17, 24),
                                "blocks.0.attn.relative_position_bias_table": torch.zeros(5 * 5 + 3, 2)})
    del per_block["rel_pos_bias.relative_position_bias_table"]
    info = beit_from_original(per_block)[0]
    assert {k: info[k] for k in ("qkv_bias", "init_values", "use_shared_rel_pos_bias", "use_rel_pos_bias",
                                 "use_abs_pos_emb", "num_heads", "img_size")} == dict(
        qkv_bias=True, init_values=0.1, use_shared_rel_pos_bias=False, use_rel_pos_bias=True, use_abs_pos_emb=True,
        num_heads=2, img_size=12)


@pytest.mark.parametrize("rows", [4 * 4 + 3, 26 + 3, 7 * 7 + 2])
def test_a_relative_table_of_no_square_grid_is_refused_not_read_at_its_floor(rows):
    """(2G-1)^2+3 rows make a GxG grid's table: an even side (4x4+3) or no square at all (26+3, 49+2) is none."""
    with pytest.raises(ValueError, match=rf"^rel_pos_bias\.relative_position_bias_table has {rows} rows, not "
                                         r"\(2G-1\)\^2\+3 for a square grid G; only square grids can be inferred, "
                                         r"pass img_size$"):
        beit_from_original(_shapes_only(rows))


def _checkpoint(tmp_path, **flags):
    model = BEiT(BEiTConfig(**{**TINY, **flags})).eval()
    return model, atomic_save({"model": model.state_dict()}, tmp_path / "beit.pth")


def test_an_override_of_the_wrong_shape_is_named_with_both_shapes(tmp_path):
    _, path = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"does not fit BEiT\(.*\): missing \[\], unexpected \[\], wrong shape "
                                         r"\[\('lm_head\.bias', \(16,\), \(8,\)\), \('lm_head\.weight', \(16, 32\), "
                                         r"\(8, 32\)\)\]; check the overrides$"):
        load_original_beit(path, vocab_size=8)


def test_layer_scale_in_the_checkpoint_is_kept_even_when_an_override_turns_it_off(tmp_path):
    """``init_values`` is a start value: the trained γ in the file are what the model computes with."""
    model, path = _checkpoint(tmp_path, init_values=0.1)
    with torch.no_grad():
        model.blocks[1].gamma_2.fill_(0.5)
    atomic_save({"model": model.state_dict()}, path)
    loaded = load_original_beit(path, init_values=None)
    assert torch.equal(loaded.blocks[1].gamma_2, torch.full((32,), 0.5))


@pytest.mark.parametrize("marker", ["lm_head.weight", "blocks.3.attn.relative_position_bias_table",
                                    "rel_pos_bias.relative_position_bias_table", "blocks.0.gamma_1",
                                    "blocks.0.attn.q_bias"])
def test_each_of_beits_own_keys_marks_a_beit_state_dict(marker):
    vit = {"patch_embed.proj.weight": torch.zeros(1), "blocks.0.attn.qkv.weight": torch.zeros(1),
           "blocks.0.attn.qkv.bias": torch.zeros(1), "head.weight": torch.zeros(1), "pos_embed": torch.zeros(1)}
    assert not holds_beit_keys(vit)
    assert holds_beit_keys({**vit, marker: torch.zeros(1)})


def test_per_block_timm_keys_of_a_model_with_per_block_tables_are_its_own():
    state = BEiT(BEiTConfig(**TINY, use_shared_rel_pos_bias=False, use_rel_pos_bias=True)).state_dict()
    keys = set(beit_to_timm(state, per_block=True))
    assert keys == {k for k in state if not k.endswith("relative_position_index")} - {"mask_token", "lm_head.weight",
                                                                                      "lm_head.bias"}
