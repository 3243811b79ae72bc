"""Details of SPEC.md (LoMaR, MAE) that the golden vectors cannot see at their tolerance (atol 1e-5,
rtol 1e-4) or do not exercise: LayerNorm eps, exact GELU, the iRPE table's shape and start, the
target normalisation's eps and variance, the loss reduction, and the MAE decoder's defaults."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from lomar.models.lomar import LoMaR
from lomar.models.mae import MAE
from lomar.models.masking import sample_plan, window_token_index
from lomar.models.objective import normalize_targets, patchify
from lomar.models.vit import VisionTransformer, ViTConfig

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def _models() -> list[nn.Module]:
    torch.manual_seed(0)
    rpe, abs_ = ViTConfig(**TINY), ViTConfig(**TINY, pos="abs")
    return [LoMaR(rpe, 7, 1), MAE(abs_, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2),
            VisionTransformer(rpe, num_classes=3), VisionTransformer(rpe, num_classes=3, global_pool="cls")]


@pytest.mark.parametrize("model", _models(), ids=["lomar", "mae", "classifier-avg", "classifier-cls"])
def test_layer_norms_are_eps_1e6_and_gelu_is_exact(model):
    # SPEC §1.6: LayerNorm eps 1e-6, MLP with exact GELU; an eps of 1e-5 moves the outputs by ~1e-5 only
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert norms and {m.eps for m in norms} == {1e-6}
    assert gelus and {m.approximate for m in gelus} == {"none"}
    for block in [m for m in model.modules() if hasattr(m, "mlp") and hasattr(m, "attn")]:
        assert block.attn.qkv.bias is not None  # qkv with bias (§1.6)
        assert block.mlp.fc1.out_features == 4 * block.mlp.fc1.in_features  # MLP ratio 4


def test_irpe_table_is_one_per_block_shared_by_heads_and_starts_at_zero():
    # SPEC §2: W (1, d, 50), zeros, one per block (every block), no head axis
    model = LoMaR(ViTConfig(**TINY), 7, 1)
    head_dim = TINY["embed_dim"] // TINY["num_heads"]
    tables = [block.attn.rpe.table for block in model.encoder.blocks]
    assert len(tables) == TINY["depth"]
    for table in tables:
        assert table.shape == (1, head_dim, 50) and torch.count_nonzero(table) == 0
    assert model.encoder.pos_embed is None  # §1.2: no absolute position in the LoMaR encoder


def test_lomar_head_is_one_linear_layer_on_the_final_norm():
    # SPEC §1.7: final LayerNorm, then a single Linear(D -> p*p*3) (not an MLP)
    model = LoMaR(ViTConfig(**TINY), 7, 1)
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (TINY["embed_dim"], TINY["patch_size"] ** 2 * 3)


def test_target_normalisation_uses_the_unbiased_variance_and_eps_1e6():
    # SPEC §1.8: (t - mean) / sqrt(var + 1e-6), unbiased variance over the p*p*3 values of a patch
    t = torch.tensor([[0.0, 1e-3, 2e-3, 4e-3]], dtype=torch.float64)  # variance near eps: eps matters
    mean = t.mean()
    var = ((t - mean) ** 2).sum() / (t.numel() - 1)
    torch.testing.assert_close(normalize_targets(t), (t - mean) / (var + 1e-6) ** 0.5, rtol=1e-12, atol=0)
    assert torch.equal(normalize_targets(t, norm_pix=False), t)


def _expected_loss(pred: torch.Tensor, images: torch.Tensor, token_index: torch.Tensor,
                   image_index: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """SPEC §1.8-9 written out: per-token mean over p*p*3 of (pred - t̂)², summed over masked tokens / their count."""
    target = patchify(images.double(), p)[image_index[:, None], token_index]  # (R, T, p*p*3)
    mean = target.mean(-1, keepdim=True)
    var = ((target - mean) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)
    per_token = ((pred.double() - (target - mean) / (var + 1e-6).sqrt()) ** 2).mean(-1)
    return (per_token * mask).sum() / mask.sum()


def _flat_images() -> torch.Tensor:
    # Patches of tiny variance (about eps): a target eps of 1e-5, or the biased variance, changes the loss a lot.
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 32, 32, generator=gen) * 1e-3 + torch.randn(2, 3, 1, 1, generator=gen)


def test_lomar_loss_is_the_specs_formula_on_nearly_flat_patches():
    torch.manual_seed(0)
    model = LoMaR(ViTConfig(**TINY), 7, 1).eval()
    images = _flat_images()
    plan = sample_plan(2, (8, 8), 7, 1, 0.8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images, plan=plan)
    image_index, top_left, mask = plan.flat()
    expected = _expected_loss(out.pred, images, window_token_index(top_left, 7, 8), image_index, mask, 4)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=0)


def test_mae_loss_is_the_specs_formula_over_removed_patches():
    torch.manual_seed(0)
    model = MAE(ViTConfig(**TINY, pos="abs"), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).eval()
    images = _flat_images()
    with torch.no_grad():
        out = model(images, generator=torch.Generator().manual_seed(1))
    assert int(out.mask.sum(1)[0]) == 64 - int(64 * (1 - 0.75))  # len_keep = floor(L * (1 - ratio)), §5
    every = torch.arange(64).expand(2, -1)
    expected = _expected_loss(out.pred, images, every, torch.arange(2), out.mask.double(), 4)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=0)


def test_mae_defaults_are_vit_b_recipe():
    # SPEC §5: mask ratio 0.75, decoder width 512, depth 8, 16 heads; norm_pix_loss on (§1.8, the recipe's)
    defaults = {name: p.default for name, p in inspect.signature(MAE.__init__).parameters.items()}
    assert (defaults["decoder_embed_dim"], defaults["decoder_depth"], defaults["decoder_num_heads"]) == (512, 8, 16)
    assert defaults["mask_ratio"] == 0.75 and defaults["norm_pix_loss"] is True
    lomar = {name: p.default for name, p in inspect.signature(LoMaR.__init__).parameters.items()}
    assert (lomar["window_size"], lomar["num_windows"], lomar["mask_ratio"]) == (7, 4, 0.8)
    assert lomar["norm_pix_loss"] is True


def test_mae_decays_its_tokens_and_leaves_its_fixed_position_tables_out():
    # SPEC §4 (MAE's rule too): decay all but biases and 1-D parameters, so cls and mask tokens are decayed;
    # the sin-cos tables are fixed in pretraining (§5) and not trained at all
    from lomar.train.schedule import param_groups  # the optimizer's groups live in the training layer

    model = MAE(ViTConfig(**TINY, pos="abs"), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"encoder.cls_token", "mask_token", "encoder.patch_embed.proj.weight"} <= decayed
    grouped = decayed | {names[id(p)] for p in no_decay["params"]}
    assert not {"encoder.pos_embed", "decoder_pos_embed"} & grouped
    assert not model.encoder.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_beit_pretraining_builds_the_recipes_model():
    # BEIT_SPEC §4: shared relative position bias, no absolute or per-block one, q/v biases, LN eps 1e-6,
    # drop path 0.1 (linspace over the blocks), layer scale 0.1 (ViT-B and smaller; 1e-5 from ViT-L's width)
    from types import SimpleNamespace

    from lomar.methods.beit import build, layer_scale_init  # the method module sits above the models
    from lomar.models.vit import model_config
    from lomar.tokenizers import KMeansTokenizer

    tokenizer = KMeansTokenizer(torch.randn(16, 3 * 8 * 8), patch=8, input_size=32)
    config = SimpleNamespace(layer_scale_init=None, window_size=7, windows=0, mask_ratio=None, tokenizer="given")
    model = build(config, model_config("vit_small_patch16", depth=3, img_size=64), tokenizer)
    beit = model.beit.config
    assert (beit.use_shared_rel_pos_bias, beit.use_rel_pos_bias, beit.use_abs_pos_emb) == (True, False, False)
    assert beit.qkv_bias and beit.norm_eps == 1e-6 and beit.drop_path_rate == 0.1 and beit.vocab_size == 16
    assert [round(block.drop_path.drop_prob, 6) for block in model.beit.blocks[1:]] == [0.05, 0.1]
    assert all(torch.all(block.gamma_1 == 0.1) for block in model.beit.blocks)
    assert layer_scale_init(768) == 0.1 and layer_scale_init(1024) == layer_scale_init(1280) == 1e-5


@pytest.mark.parametrize("grid", [(5, 31), (31, 5), (2, 2)])
def test_irpe_buckets_follow_the_specs_integer_map_on_any_grid(grid):
    # SPEC §2: f(x) = 0, ±1, ±2 for |x| in 2..3, ±3 from 4 on; bucket = (f(dy)+3)*7 + (f(dx)+3), 49 for cls pairs
    # (the golden vectors cover square 7x7 and 14x14 grids only: offsets up to 13, one axis length)
    from lomar.models.rpe import bucket_rows, bucket_table, offset_buckets

    def f(x: int) -> int:
        return 0 if x == 0 else (1 if abs(x) == 1 else 2 if abs(x) <= 3 else 3) * (1 if x > 0 else -1)

    height, width = grid
    cells = [(y, x) for y in range(height) for x in range(width)]
    expected = torch.full((len(cells) + 1, len(cells) + 1), 49, dtype=torch.long)
    for i, (yi, xi) in enumerate(cells, start=1):
        for j, (yj, xj) in enumerate(cells, start=1):
            expected[i, j] = (f(yi - yj) + 3) * 7 + (f(xi - xj) + 3)
    assert torch.equal(bucket_table(grid), expected)
    assert torch.equal(bucket_rows(offset_buckets(grid), grid, 3, len(cells) + 1), expected[3:])


def test_the_classifier_pools_the_patch_tokens_alone_then_fc_norm_then_the_head():
    # SPEC §3: global average pool over the patch tokens (cls excluded), then fc_norm, then the Linear head. A cls
    # token far from the patches and a head of unit weights (the recipe's std 2e-5 would hide any error) make a pool
    # that takes cls in, or a norm before the pool, show.
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**TINY), num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.cls_token.normal_(std=10.0)
        nn.init.normal_(model.head.weight)
        tokens = model.forward_blocks(*model.embed(images))
        pooled = tokens[:, 1:].mean(dim=1)
        normed = (pooled - pooled.mean(-1, keepdim=True)) / (pooled.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
        expected = (normed * model.fc_norm.weight + model.fc_norm.bias) @ model.head.weight.T + model.head.bias
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)


def _beit_pretrain_model():
    from types import SimpleNamespace

    from lomar.methods.beit import build  # the method module sits above the models
    from lomar.models.vit import model_config
    from lomar.tokenizers import KMeansTokenizer

    tokenizer = KMeansTokenizer(torch.randn(16, 3 * 8 * 8), patch=8, input_size=32)
    config = SimpleNamespace(layer_scale_init=None, window_size=7, windows=0, mask_ratio=None, tokenizer="given")
    return build(config, model_config("vit_tiny_patch16", depth=2, img_size=64), tokenizer)


def test_beit_pretraining_decays_its_mask_token_and_bias_table_but_not_its_cls_token():
    # BEIT_SPEC §4 (optim_factory.get_parameter_groups with the model's no_weight_decay {pos_embed, cls_token}): no
    # decay for 1-D tensors (γ, q/v biases, norms), biases and cls_token; mask_token and the rel-pos table ARE decayed
    from lomar.train.schedule import param_groups  # the optimizer's groups live in the training layer

    model = _beit_pretrain_model()
    no_decay, decay = param_groups(model, 0.05)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"beit.mask_token", "beit.rel_pos_bias.relative_position_bias_table", "beit.patch_embed.proj.weight",
            "beit.lm_head.weight", "beit.blocks.0.attn.qkv.weight"} <= decayed
    assert {"beit.cls_token", "beit.blocks.0.gamma_1", "beit.blocks.0.attn.q_bias", "beit.blocks.0.attn.v_bias",
            "beit.norm.weight", "beit.lm_head.bias"} <= skipped
    assert all(n == "beit.cls_token" or model.get_parameter(n).ndim == 1 for n in skipped)
    assert len(decayed) + len(skipped) == len(names)


def test_beit_init_spreads_as_a_truncation_at_one_std_and_scales_proj_and_fc2_by_root_2l():
    # BEIT_SPEC §1.9: trunc_normal cut at ±1 std (real std 0.5396·0.02, not timm's untruncated 0.02) for every Linear
    # and the patch-embedding conv; then block l's attn.proj and mlp.fc2 ÷ √(2l) (a max bound alone would pass ÷ 2l)
    from lomar.models.beit import BEiT, BEiTConfig

    torch.manual_seed(0)
    std = 0.02
    model = BEiT(BEiTConfig(img_size=64, patch_size=8, embed_dim=64, depth=3, num_heads=4, vocab_size=64))
    truncated_std = std * 0.5396
    for weight in (model.blocks[0].mlp.fc1.weight, model.patch_embed.proj.weight, model.lm_head.weight):
        assert weight.abs().max() <= std + 1e-9
        assert abs(weight.std().item() - truncated_std) < 0.05 * truncated_std
    for layer, block in enumerate(model.blocks, start=1):
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            expected = truncated_std / math.sqrt(2 * layer)
            assert abs(weight.std().item() - expected) < 0.05 * expected, (layer, tuple(weight.shape))
