"""The relative position terms dense transfer adds to an encoder without iRPE: ViTDet's decomposed
term and mmsegmentation's per-block table, checked against their formulas written out pair by pair."""

from dataclasses import replace

import pytest
import torch

from lomar.integrations.dense import with_rel_pos
from lomar.models.relpos import (
    axis_table,
    decomposed_bias,
    fit_axis_tables,
    resize_axis_table,
    table_bias,
    table_rows,
)
from lomar.models.vit import VisionTransformer, ViTConfig

MAE = ViTConfig(img_size=96, patch_size=16, embed_dim=32, depth=4, num_heads=2, pos="abs", window_size=4,
                global_blocks=(1, 3))


def test_decomposed_bias_is_vitdets_formula_pair_by_pair():
    """bias[q=(y, x), k=(y', x')] = q·R_h[y - y' + H - 1] + q·R_w[x - x' + W - 1]; 0 for pairs with cls."""
    torch.manual_seed(0)
    b, heads, height, width, d = 2, 3, 3, 4, 5
    q = torch.randn(b, heads, 1 + height * width, d)
    rel_h, rel_w = torch.randn(2 * height - 1, d), torch.randn(2 * width - 1, d)
    bias = decomposed_bias(q, rel_h, rel_w, (height, width))
    assert bias.shape == (b, heads, 1 + height * width, 1 + height * width)
    for i in range(height * width):
        for j in range(height * width):
            (yi, xi), (yj, xj) = divmod(i, width), divmod(j, width)
            want = q[:, :, 1 + i] @ (rel_h[yi - yj + height - 1] + rel_w[xi - xj + width - 1])
            torch.testing.assert_close(bias[:, :, 1 + i, 1 + j], want)
    assert not bias[:, :, 0].any() and not bias[:, :, :, 0].any()
    with pytest.raises(ValueError, match="do not match"):
        decomposed_bias(q, rel_h, rel_w, (4, 4))


def test_axis_tables_are_resampled_linearly_to_another_size():
    table = torch.arange(5.0)[:, None].repeat(1, 2)  # offsets -2..2 of a 3-long axis
    assert torch.equal(axis_table(table, 3)[2, 0], table[4]) and torch.equal(axis_table(table, 3)[0, 2], table[0])
    wider = resize_axis_table(table, 9)
    assert wider.shape == (9, 2) and torch.all(wider[1:] >= wider[:-1])  # a ramp stays monotone
    torch.testing.assert_close(resize_axis_table(torch.full((5, 2), 0.5), 9), torch.full((9, 2), 0.5))
    state = {"a.attn.rel_pos_h": table, "a.attn.rel_pos_w": table, "a.attn.qkv.weight": torch.zeros(3, 2)}
    fitted = fit_axis_tables(state, {"a.attn.rel_pos_h": torch.Size([9, 2]), "a.attn.rel_pos_w": torch.Size([5, 2]),
                                     "a.attn.qkv.weight": torch.Size([6, 2])})
    assert fitted["a.attn.rel_pos_h"].shape == (9, 2) and fitted["a.attn.rel_pos_w"] is table
    assert fitted["a.attn.qkv.weight"].shape == (3, 2)  # not a table: left for load_state_dict to refuse


@pytest.mark.parametrize("old, new", [(5, 9), (9, 5), (3, 13)])
def test_an_axis_table_is_read_at_its_cell_centres(old, new):
    """ViTDet's ``get_rel_pos`` resamples linearly with PyTorch's default ``align_corners=False``: entry j of the new
    table reads the old one at (j + 1/2)·old/new − 1/2, clamped to its ends."""
    table = torch.arange(float(old))[:, None] * torch.tensor([1.0, -2.0])  # a ramp per column
    at = [min(max((j + 0.5) * old / new - 0.5, 0.0), old - 1.0) for j in range(new)]
    expected = torch.tensor(at)[:, None] * torch.tensor([1.0, -2.0])
    torch.testing.assert_close(resize_axis_table(table, new), expected, rtol=0, atol=1e-5)


def test_table_rows_read_subgrids_and_resample_for_larger_grids():
    def whole(table, table_grid, grid):
        return table_rows(table, table_grid, grid)(0, grid[0] * grid[1] + 1)[0]

    torch.manual_seed(0)
    table = torch.randn(5 * 7 + 3, 2)  # built for a 3x4 grid
    torch.testing.assert_close(whole(table, (3, 4), (2, 3)), table_bias(table, (3, 4), (2, 3)))
    larger = whole(table, (3, 4), (5, 6))
    assert larger.shape == (2, 31, 31)
    assert torch.equal(larger[:, 0, 0], table[-1]) and torch.equal(larger[:, 0, 1], table[-3])
    assert torch.equal(larger[:, 1, 0], table[-2])  # the cls entries are kept
    # the resampling is centred: offset (0, 0) of the 9x11 offsets lands on the 5x7 table's centre, 2 * 7 + 3
    torch.testing.assert_close(torch.diagonal(larger[:, 1:, 1:], dim1=1, dim2=2), table[17][:, None].expand(2, 30))
    constant = whole(torch.full((38, 2), 0.25), (3, 4), (5, 6))
    torch.testing.assert_close(constant, torch.full_like(constant, 0.25))


@pytest.mark.parametrize("rel_pos", ["decomposed", "bias"])
def test_a_zero_term_changes_nothing_and_a_trained_one_trains(rel_pos):
    """Zero-initialised, as ViTDet and mmsegmentation start it: the encoder computes exactly what it did
    (windowed and global blocks, a grid other than the configured one); the tables get gradients."""
    torch.manual_seed(0)
    plain = VisionTransformer(MAE).eval()
    model = VisionTransformer(replace(MAE, rel_pos=rel_pos)).eval()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and len(missing) == (8 if rel_pos == "decomposed" else 4)
    images = torch.randn(2, 3, 96, 128)
    torch.testing.assert_close(model.forward_features(images), plain.forward_features(images))
    tables = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in
              ("rel_pos_h", "rel_pos_w", "relative_position_bias_table")]
    for p in tables:
        torch.nn.init.normal_(p, std=0.2)
    out = model.forward_features(images)
    assert not torch.allclose(out, plain.forward_features(images), atol=1e-3)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tables)


def test_table_sizes_follow_each_blocks_grid():
    """ViTDet's rule: a windowed block's tables span its window, a global block's the image's grid."""
    model = VisionTransformer(replace(MAE, rel_pos="decomposed"))
    assert [tuple(b.attn.rel_pos_h.shape) for b in model.blocks] == [(7, 16), (11, 16), (7, 16), (11, 16)]
    # offsets -(W-1)..W-1 as ViTDet's keys hold them: the forward resamples a table of another length (get_rel_pos)
    assert [tuple(b.attn.rel_pos_w.shape) for b in model.blocks] == [(7, 16), (11, 16), (7, 16), (11, 16)]
    bias = VisionTransformer(replace(MAE, rel_pos="bias", window_size=0, global_blocks=()))
    assert all(b.attn.relative_position_bias_table.shape == (11 * 11 + 3, 2) for b in bias.blocks)


def test_the_term_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="without iRPE"):
        replace(MAE, pos="rpe", rel_pos="decomposed")
    with pytest.raises(ValueError, match="rel_pos must be one of"):
        replace(MAE, rel_pos="swin")
    model = VisionTransformer(replace(MAE, rel_pos="decomposed"))
    tokens, grid = model.embed(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="needs every token of the grid"):
        model.forward_blocks(tokens[:, :10], grid)  # MAE's visible subset: no grid to take offsets on


def test_with_rel_pos_picks_the_recipes_term_for_mae_only():
    mae, lomar = VisionTransformer(MAE), VisionTransformer(replace(MAE, pos="rpe"))
    assert with_rel_pos(mae, "auto", "decomposed").config.rel_pos == "decomposed"
    assert with_rel_pos(mae, "auto", "bias").config.rel_pos == "bias"
    assert with_rel_pos(mae, "none", "bias") is mae and with_rel_pos(lomar, "auto", "decomposed") is lomar
    with pytest.raises(ValueError, match="a LoMaR encoder has its own relative position"):
        with_rel_pos(lomar, "bias", "decomposed")
    kept = with_rel_pos(mae, "decomposed", "decomposed")
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in mae.state_dict().items())


def test_a_pretrained_encoder_loads_with_its_new_term_reported_fresh(tmp_path):
    from lomar import export_encoder
    from lomar.eval.features import load_pretrained_encoder

    torch.manual_seed(0)
    pretrained = VisionTransformer(MAE)
    export_encoder(pretrained, tmp_path / "mae")
    encoder = load_pretrained_encoder(tmp_path / "mae", rel_pos="bias")
    assert encoder.config.rel_pos == "bias"
    assert sorted(encoder.load_report.fresh) == [f"blocks.{i}.attn.relative_position_bias_table" for i in range(4)]
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in pretrained.state_dict().items())


@pytest.mark.parametrize("rel_pos", ["decomposed", "bias"])
def test_chunked_attention_gives_the_dense_terms_result_and_gradients(rel_pos):
    """By query chunks (the path `auto` takes where the whole bias would be large), with each chunk's bias
    recomputed in the backward pass: the same output and gradients as the whole bias."""
    torch.manual_seed(0)
    models = {mode: VisionTransformer(replace(MAE, rel_pos=rel_pos, attention=mode, window_size=0, global_blocks=()))
              for mode in ("dense", "chunked")}
    for name, p in models["dense"].named_parameters():
        if name.rsplit(".", 1)[-1] in ("rel_pos_h", "rel_pos_w", "relative_position_bias_table"):
            torch.nn.init.normal_(p, std=0.2)  # a term that matters
    models["chunked"].load_state_dict(models["dense"].state_dict())
    images = torch.randn(2, 3, 128, 128)  # 8x8 grid, 65 tokens: chunks of 16 queries, the last one of 1
    outs = {}
    for mode, model in models.items():
        outs[mode] = model.forward_features(images)
        outs[mode].square().sum().backward()
    torch.testing.assert_close(outs["chunked"], outs["dense"])
    named = dict(models["dense"].named_parameters())
    for name, p in models["chunked"].named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bias_rows_are_the_rows_of_the_whole_bias():
    from lomar.models.attention import biased_attention
    from lomar.models.relpos import decomposed_rows

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 1 + 3 * 4, 8).unbind(0)
    rows = decomposed_rows(q, torch.randn(5, 8), torch.randn(7, 8), (3, 4))
    whole = rows(0, 13)
    assert torch.equal(torch.cat([rows(0, 1), rows(1, 6), rows(6, 13)], dim=2), whole)
    table = table_rows(torch.randn(5 * 7 + 3, 2), (3, 4), (3, 4))
    assert torch.equal(torch.cat([table(0, 5), table(5, 13)], dim=2), table(0, 13))
    key_bias = torch.zeros(2, 1, 1, 13).masked_fill(torch.arange(13) > 10, float("-inf"))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=whole + key_bias)
    for chunk in (1, 4, 13):
        torch.testing.assert_close(biased_attention(q, k, v, rows, "chunked", key_bias, chunk=chunk), want)
