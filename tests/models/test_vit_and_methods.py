"""ViT, LoMaR and MAE: shapes for every named size, gradients, masking plans, position tables (RPE buckets, sin-cos,
resampling), patchify, a new classifier head's initialisation, and compiled models at a second size."""

import numpy as np
import pytest
import torch
from tiny_widths import TINY

import lomar
from lomar import MAE, LoMaR, MaskingPlan, VisionTransformer, ViTConfig, model_config
from lomar.models.abs_pos import sincos_pos_embed_2d, table_for_grid
from lomar.models.objective import gather_patches, patchify, unpatchify
from lomar.models.rpe import bucket_table, piecewise_index
from lomar.models.vit import MODEL_SIZES, PATCH_SIZES


@pytest.mark.parametrize("size", list(MODEL_SIZES))
@pytest.mark.parametrize("patch", PATCH_SIZES)
def test_named_configs(size, patch):
    cfg = model_config(f"vit_{size}_patch{patch}")
    dim, depth, heads = MODEL_SIZES[size]
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (dim, depth, heads, patch)


# Every named size at 224/384/448 with patch 16, plus patches 8 and 14 where they tile
# (a 56x56 grid of patch 8 at 448 only costs time, not coverage). Widths shrunk to TINY.
SHAPE_CASES = ([(f"vit_{s}_patch16", img, pos) for s in MODEL_SIZES for img in (224, 384, 448)
                for pos in ("rpe", "abs", "none")]
               + [("vit_small_patch8", 224, "rpe"), ("vit_large_patch14", 224, "rpe"),
                  ("vit_large_patch14", 448, "abs"), ("vit_huge_patch14", 384, "rpe")])


@pytest.mark.parametrize("name, img, pos", SHAPE_CASES)
def test_encoder_shapes(name, img, pos):
    # the named size's own head count (width 8 per head, one block), so sizes stay distinct
    heads = model_config(name).num_heads
    cfg = model_config(name, img_size=img, pos=pos, embed_dim=8 * heads, depth=1)
    if img % cfg.patch_size:
        with pytest.raises(ValueError, match=f"img_size {img} is not divisible by the encoder's patch_size"):
            VisionTransformer(cfg)
        return
    model = VisionTransformer(cfg)
    x = torch.randn(1, 3, img, img)
    tokens = model.forward_features(x)
    assert tokens.shape == (1, 1 + (img // cfg.patch_size) ** 2, 8 * heads)
    assert model.blocks[0].attn.num_heads == heads
    assert model(x).shape == (1, 8 * heads)


@pytest.mark.parametrize("patch, img, windows", [(16, 224, 4), (16, 384, 6), (16, 448, 9), (8, 224, 4), (14, 448, 9)])
def test_lomar_shapes_and_backward(patch, img, windows):
    model = LoMaR(model_config(f"vit_base_patch{patch}", img_size=img, **TINY), num_windows=windows)
    out = model(torch.randn(2, 3, img, img), generator=torch.Generator().manual_seed(0))
    assert out.pred.shape == (2 * windows, 49, patch * patch * 3)
    assert out.plan.top_left.shape == (2, windows, 2) and out.loss.ndim == 0
    out.loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    for block in model.encoder.blocks:
        assert block.attn.rpe.table.grad.abs().sum() > 0
    assert model.encoder.cls_token.grad.abs().sum() > 0


def test_lomar_cost_ignores_image_size():
    """The encoder sees the same number of tokens at any resolution (fixed window count)."""
    model = LoMaR(model_config("vit_base_patch16", img_size=224, **TINY), num_windows=4)
    seen = []
    hook = model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    for img in (224, 448, 896):
        model(torch.randn(1, 3, img, img), generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert seen == [(4, 50, 24)] * 3


def test_lomar_plan_reproduces_and_given_plan_is_used():
    model = LoMaR(model_config("vit_tiny_patch16", **TINY)).eval()
    x = torch.randn(2, 3, 224, 224)
    a = model(x, generator=torch.Generator().manual_seed(5))
    b = model(x, plan=a.plan)
    c = model(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.pred, b.pred) and torch.equal(a.loss, c.loss)


def test_lomar_window_tokens_match_full_grid_embedding():
    model = LoMaR(model_config("vit_tiny_patch16", **TINY))
    x = torch.randn(2, 3, 224, 224)
    plan = model.sample_plan(x, torch.Generator().manual_seed(0))
    image, top_left, _ = plan.flat()
    index = lomar.models.masking.window_token_index(top_left, 7, 14)
    pixels = gather_patches(x, 16, image, index)
    direct = model.encoder.patch_embed.embed_patches(pixels.flatten(2))
    full = model.encoder.patch_embed(x)[image[:, None], index]
    torch.testing.assert_close(direct, full, atol=1e-5, rtol=1e-5)


def test_gathered_window_pixels_are_patchifys_patches_on_a_wide_and_a_tall_image():
    """On an image of other height than width the grid's row length is its width in patches, as patchify lays
    it out."""
    p = 4
    for height, width in ((16, 28), (28, 16)):
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
        grid = (height // p, width // p)
        plan = lomar.models.masking.sample_plan(2, grid, 3, 2, 0.5, generator=torch.Generator().manual_seed(1))
        image, top_left, _ = plan.flat()
        index = lomar.models.masking.window_token_index(top_left, 3, grid[1])  # (R, 9)
        pixels = gather_patches(images, p, image, index)  # (R, 9, C, p, p)
        expected = patchify(images, p)[image[:, None], index]  # (R, 9, p*p*C), per patch (row, col, channel)
        assert torch.equal(pixels.permute(0, 1, 3, 4, 2).flatten(2), expected)


def test_lomar_only_masked_tokens_count():
    model = LoMaR(model_config("vit_tiny_patch16", **TINY)).eval()
    x = torch.randn(1, 3, 224, 224)
    out = model(x, generator=torch.Generator().manual_seed(0))
    # Changing the head output of visible tokens must not change the loss.
    image, top_left, mask = out.plan.flat()
    hooked = model.head.register_forward_hook(lambda m, a, y: torch.where(mask[..., None], y, y + 100.0))
    again = model(x, plan=out.plan)
    hooked.remove()
    torch.testing.assert_close(out.loss, again.loss)


def test_lomar_plan_errors():
    model = LoMaR(model_config("vit_tiny_patch16", **TINY))
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(ValueError, match="plan is for 2 images"):
        model(x, plan=MaskingPlan(torch.zeros(2, 1, 2, dtype=torch.long), torch.zeros(2, 1, 49, dtype=torch.bool), 7))
    with pytest.raises(ValueError, match="5x5 windows"):
        model(x, plan=MaskingPlan(torch.zeros(1, 1, 2, dtype=torch.long), torch.zeros(1, 1, 25, dtype=torch.bool), 5))
    with pytest.raises(ValueError, match="does not fit the 4x4 patch grid"):
        LoMaR(model_config("vit_tiny_patch16", img_size=64, **TINY))
    with pytest.raises(ValueError, match="only 4 window positions"):
        LoMaR(model_config("vit_tiny_patch16", img_size=128, **TINY), num_windows=5)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(1, 3, 230, 224))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, H, W\), got \(1, 1, 224, 224\)"):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match="expected images of shape"):
        model(torch.randn(3, 224, 224))


def test_mae_noise_reproduces_mask_and_backward():
    model = MAE(model_config("vit_tiny_patch16", img_size=64, pos="abs", **TINY),
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    x = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 16)
    out = model(x, noise=noise)
    assert out.pred.shape == (2, 16, 768) and out.mask.sum() == 2 * 12
    kept = noise.argsort(1)[:, :4]
    assert (out.mask.gather(1, kept) == 0).all()
    torch.testing.assert_close(model(x, noise=noise).loss, out.loss)
    out.loss.backward()
    assert model.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="noise must have shape"):
        model(x, noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match="absolute position"):
        MAE(model_config("vit_tiny_patch16", **TINY))


def test_rpe_buckets_any_grid():
    assert piecewise_index(torch.arange(-6, 7)).tolist() == [-3, -3, -3, -2, -2, -1, 0, 1, 2, 2, 3, 3, 3]
    for grid in [(7, 7), (14, 14), (24, 24), (28, 28), (3, 5)]:
        table = bucket_table(grid)
        n = grid[0] * grid[1] + 1
        assert table.shape == (n, n) and int(table.max()) == 49 and (table[0] == 49).all()
        assert (table[1:, 1:] < 49).all() and (table.diagonal()[1:] == 24).all()
    assert bucket_table((14, 14)) is bucket_table((14, 14))  # cached


def test_sincos_layout():
    table = sincos_pos_embed_2d(8, (2, 3))
    assert table.shape == (7, 8) and (table[0] == 0).all()
    # patch (row 1, col 2): first half encodes x=2, second half y=1
    torch.testing.assert_close(table[1 + 5, 0], torch.tensor(2.0).sin())
    torch.testing.assert_close(table[1 + 5, 4], torch.tensor(1.0).sin())


@pytest.mark.parametrize("dim, grid", [(768, (14, 14)), (64, (3, 5))])
def test_sincos_table_is_maes_formula_at_every_frequency(dim, grid):
    # SPEC §5, written out independently: half the width encodes x (the column), half y (the row); each
    # half is sin then cos of pos * 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1
    quarter = dim // 4
    freq = 10000.0 ** (-np.arange(quarter) / quarter)
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    half = lambda pos: np.concatenate([np.sin(np.outer(pos, freq)), np.cos(np.outer(pos, freq))], axis=1)
    expected = np.concatenate([np.zeros((1, dim)), np.concatenate([half(cols), half(rows)], axis=1)])
    np.testing.assert_allclose(sincos_pos_embed_2d(dim, grid).numpy(), expected, atol=1e-6)


def test_a_table_at_another_grid_is_resampled_from_the_grid_it_was_made_for():
    """One rule (MAE's finetuning, timm): bicubic from the source grid, which a sin-cos table names when no setting
    does; a table at its own grid is untouched, and a grid that cannot be the table's is refused."""
    from timm.layers import resample_abs_pos_embed

    fixed = sincos_pos_embed_2d(8, (2, 6))[None]  # 12 tokens: also 3x4, 4x3, 6x2, ...
    for grid in ((3, 5), (6, 2)):  # another grid; the transposed one, of as many tokens
        torch.testing.assert_close(table_for_grid(fixed, grid), resample_abs_pos_embed(fixed, list(grid), [2, 6],
                                                                                       antialias=False))
    assert table_for_grid(fixed, (2, 6)) is fixed
    trained = torch.randn(1, 13, 8)
    assert table_for_grid(trained, (3, 4)) is trained  # no grid known: the model's, whose token count it has
    with pytest.raises(ValueError, match=r"12 tokens \(a non-square grid\) cannot be resized to the 4x4 grid"):
        table_for_grid(trained, (4, 4))
    with pytest.raises(ValueError, match="a position table of 12 tokens is not of the 4x4 grid"):
        table_for_grid(trained, (4, 4), (4, 4))


def test_a_new_classifier_head_is_initialised_as_the_finetuning_recipe_says():
    torch.manual_seed(0)
    head = VisionTransformer(model_config("vit_small_patch16"), num_classes=1000).head
    # trunc_normal_(std=2e-5) as MAE calls it: its default cut is at +-2 absolute, so no cut at this std
    assert abs(head.weight.std().item() / 2e-5 - 1) < 0.05 and head.weight.abs().max() > 4e-5
    assert torch.equal(head.bias, torch.zeros(1000))


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 32, 48)
    p = patchify(x, 16)
    assert p.shape == (2, 6, 768)
    assert torch.equal(unpatchify(p, 16, (2, 3)), x)
    # element order within a patch is (row, col, channel)
    assert torch.equal(p[0, 1, :3], x[0, :, 0, 16])


def test_abs_interpolates_and_classifier():
    model = VisionTransformer(model_config("vit_tiny_patch16", pos="abs", **TINY), num_classes=5)
    assert model(torch.randn(1, 3, 320, 256)).shape == (1, 5)
    assert model.pos_embed_for((20, 16)).shape == (1, 321, 24)


def test_compiled_models_sample_masks_at_a_second_image_size():
    """Dynamo marks shapes dynamic at the second size; random draws must stay out of the graph
    (``torch.rand`` with symbolic sizes failed). backend='eager': tracing only, no compiler."""
    torch._dynamo.reset()
    for size in (32, 48):
        model = LoMaR(model_config("vit_tiny_patch8", img_size=size, **TINY), window_size=3, num_windows=2)
        compiled = torch.compile(model, backend="eager")
        assert torch.isfinite(compiled(torch.randn(2, 3, size, size)).loss)
        mae = MAE(model_config("vit_tiny_patch8", img_size=size, pos="abs", **TINY),
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
        assert torch.isfinite(torch.compile(mae, backend="eager")(torch.randn(2, 3, size, size)).loss)


def test_pretraining_keeps_an_absolute_table_fixed_and_the_encoder_alone_trains_it():
    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, pos="abs")
    assert VisionTransformer(config).pos_embed.requires_grad  # finetuning, detection, segmentation
    assert not LoMaR(config, 3, 2).encoder.pos_embed.requires_grad
    assert not MAE(config, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).encoder.pos_embed.requires_grad
