"""BEiT model: shapes, gradients, masked-only loss, config checks, init, bias for any grid, timm equality."""

import math

import pytest
import torch
from torch import nn

from lomar.checkpoints.io import atomic_save
from lomar.checkpoints.keys_beit import beit_from_original, beit_to_timm, load_original_beit, per_block_from_shared
from lomar.models.beit import BEiT, BEiTConfig
from lomar.models.relpos import relative_position_index

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, vocab_size=16, drop_path_rate=0.0)


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters everywhere, so zero-initialised tables and tokens matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _inputs(n: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    mask = torch.rand(n, 16, generator=gen) < 0.4
    mask[:, 0] = True
    ids = torch.randint(0, 16, (n, 16), generator=gen)
    return images, mask, ids


def test_config_from_dict_reads_its_own_keys_only():
    meta = {"method": "beit", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4,
            "vocab_size": 16, "seed": 0, "grid": [4, 4]}  # a golden case's beit_meta.json
    assert BEiTConfig.from_dict(meta) == BEiTConfig(**{**TINY, "drop_path_rate": 0.1})


def test_shapes_and_all_tokens():
    model = _perturbed(BEiT(BEiTConfig(**TINY)))
    images, mask, ids = _inputs()
    feats = model.forward_features(images, mask)
    assert feats.shape == (2, 17, 32)
    loss, logits = model(images, mask, ids)
    assert logits.shape == (int(mask.sum()), 16) and loss.shape == ()
    _, all_logits = model(images, mask, ids, return_all_tokens=True)
    assert all_logits.shape == (2, 16, 16)
    torch.testing.assert_close(all_logits[mask], logits)
    # (N, Gh, Gw) masks are accepted as well.
    torch.testing.assert_close(model(images, mask.view(2, 4, 4), ids).logits, logits)
    assert model(images, mask).loss is None


def test_gradients_reach_every_parameter():
    model = _perturbed(BEiT(BEiTConfig(**TINY))).train()
    images, mask, ids = _inputs()
    model(images, mask, ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_uses_masked_tokens_only_and_mask_replaces_pixels():
    model = _perturbed(BEiT(BEiTConfig(**TINY)))
    images, mask, ids = _inputs()
    loss, logits = model(images, mask, ids)
    expected = nn.functional.cross_entropy(logits, ids[mask])
    torch.testing.assert_close(loss, expected)
    other = torch.where(mask, ids, (ids + 1) % 16)  # change only the unmasked targets
    torch.testing.assert_close(model(images, mask, other).loss, loss)
    # Pixels of a masked patch (row 0, col 0 is always masked) cannot influence anything.
    changed = images.clone()
    changed[:, :, :8, :8] += 5.0
    torch.testing.assert_close(model.forward_features(changed, mask), model.forward_features(images, mask))
    assert BEiT.masked_labels(ids, mask).tolist() == [int(ids[i, j]) for i in range(2) for j in range(16) if mask[i, j]]


@pytest.mark.parametrize("bad, word", [(dict(img_size=30), "img_size=30"), (dict(num_heads=5), "num_heads=5"),
                                       (dict(norm_eps=0), "norm_eps=0"), (dict(vocab_size=1), "vocab_size=1"),
                                       (dict(embed_dim=0), "embed_dim=0"), (dict(num_heads=0), "num_heads=0"),
                                       (dict(drop_path_rate=1.0), "drop_path_rate=1.0"),
                                       (dict(init_values=-0.1), "init_values=-0.1"),
                                       (dict(init_values=float("nan")), "init_values=nan")])
def test_config_validation(bad, word):
    with pytest.raises(ValueError, match=word.replace(".", r"\.")):
        BEiTConfig(**{**TINY, **bad})


def test_input_validation():
    model = BEiT(BEiTConfig(**TINY)).eval()
    images, mask, ids = _inputs()
    with pytest.raises(ValueError, match="img_size=32"):
        model(torch.zeros(1, 3, 64, 64), mask[:1])
    with pytest.raises(ValueError, match="torch.bool"):
        model(images, mask.long())
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        model(images, mask[:, :10])
    with pytest.raises(ValueError, match="input_ids"):
        model(images, mask, ids[:, :5])


def test_a_mask_of_no_patch_and_ids_that_are_no_integers_are_named():
    """Nothing masked (or an empty batch) gave a NaN loss silently; float ids torch's 'expected target dtype to be
    Long', int32 ids (a valid token per patch) the same error, a list an AttributeError."""
    model = BEiT(BEiTConfig(**TINY)).eval()
    images, mask, ids = _inputs()
    with pytest.raises(ValueError, match="bool_masked_pos masks no patch"):
        model(images, torch.zeros_like(mask), ids)
    with pytest.raises(ValueError, match="bool_masked_pos masks no patch"):
        model(images[:0], mask[:0], ids[:0])
    for bad, named in ((ids.float(), "torch.float32"), (ids.tolist(), "list"), (ids.bool(), "torch.bool")):
        with pytest.raises(TypeError, match=f"input_ids must be a tensor of integer token ids.*got {named}"):
            model(images, mask, bad)
    assert torch.equal(model(images, mask, ids.int()).loss, model(images, mask, ids).loss)


def test_original_initialisation():
    torch.manual_seed(0)
    cfg = BEiTConfig(**{**TINY, "depth": 3, "init_values": 0.1})
    model = BEiT(cfg)
    std = cfg.init_std
    for p in (model.cls_token, model.mask_token, model.lm_head.weight, model.blocks[0].mlp.fc1.weight):
        assert p.abs().max() <= std + 1e-9  # truncated at ±1 std, not ±2
    for layer, block in enumerate(model.blocks, start=1):
        # truncated at ±1 std, then divided by sqrt(2 x layer) counted from 1: over 1024 draws the largest is
        # within 5 % of the bound (a draw lands there with probability 0.024)
        bound = std / math.sqrt(2 * layer)
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert 0.95 * bound <= weight.abs().max() <= bound + 1e-9, layer
        assert torch.all(block.gamma_1 == 0.1) and torch.all(block.gamma_2 == 0.1)
        assert torch.all(block.attn.q_bias == 0) and torch.all(block.attn.v_bias == 0)
        assert block.norm1.eps == block.norm2.eps == 1e-6
    assert torch.all(model.rel_pos_bias.relative_position_bias_table == 0)
    assert model.norm.eps == 1e-6 and torch.all(model.lm_head.bias == 0)
    assert not hasattr(model.blocks[0].attn, "k_bias")


def test_relative_position_index_formula_and_subgrids():
    gh, gw = 3, 4
    index = relative_position_index((gh, gw))
    n_rel = (2 * gh - 1) * (2 * gw - 1) + 3
    for i in range(gh * gw):
        for j in range(gh * gw):
            (yi, xi), (yj, xj) = divmod(i, gw), divmod(j, gw)
            assert index[1 + i, 1 + j] == (yi - yj + gh - 1) * (2 * gw - 1) + (xi - xj + gw - 1)
    assert index[0, 1:].eq(n_rel - 3).all() and index[1:, 0].eq(n_rel - 2).all() and index[0, 0] == n_rel - 1
    # A 2×2 window inside a model built for 4×4 sees the same bias as those patches of the full grid.
    model = _perturbed(BEiT(BEiTConfig(**TINY)))
    full, sub = model.rel_pos_bias_for_grid()[0], model.rel_pos_bias_for_grid((2, 2))[0]
    pos = [0, 1, 2, 5, 6]  # cls, then patches (0,0) (0,1) (1,0) (1,1) of the 4×4 grid
    torch.testing.assert_close(sub, full[:, pos][:, :, pos])
    with pytest.raises(ValueError, match="5x5"):
        model.rel_pos_bias_for_grid((5, 5))
    # Blocks run on a 2×2 window's tokens use exactly that sub-grid bias.
    tokens = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.run_blocks(tokens, (2, 2))
        manual = tokens
        for block, bias in zip(model.blocks, model.rel_pos_bias_for_grid((2, 2))):
            manual = block(manual, bias)
    torch.testing.assert_close(out, manual)
    with pytest.raises(ValueError, match="grid 3x3"):
        model.run_blocks(tokens, (3, 3))


@pytest.mark.parametrize("extra", [dict(), dict(attn_head_dim=4, qk_scale=0.3), dict(qkv_bias=False)])
def test_attention_matches_the_spec_formula(extra):
    """A = (q·scale)·kᵀ + B, qkv bias [q_bias, 0, v_bias], heads in row blocks of the weight."""
    cfg = BEiTConfig(**{**TINY, "use_shared_rel_pos_bias": False, "use_rel_pos_bias": True, **extra})
    model = _perturbed(BEiT(cfg))
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(3))
    h, d = 4, cfg.attn_head_dim or 8
    w = attn.qkv.weight
    zero = torch.zeros(h * d)
    qb, vb = (attn.q_bias, attn.v_bias) if cfg.qkv_bias else (zero, zero)
    q, k, v = (x @ w[i * h * d:(i + 1) * h * d].T + b for i, b in enumerate((qb, zero, vb)))
    q, k, v = (t.view(2, 17, h, d).transpose(1, 2) for t in (q, k, v))
    logits = (q * (cfg.qk_scale or d ** -0.5)) @ k.transpose(-1, -2) + attn.own_bias()
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 17, h * d))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    assert attn.qkv.weight.shape == (3 * h * d, 32) and attn.proj.weight.shape == (32, h * d)


@pytest.mark.parametrize("own_tables", [False, True])
def test_per_block_tables_from_shared_give_the_same_function(own_tables):
    shared = _perturbed(BEiT(BEiTConfig(**{**TINY, "use_rel_pos_bias": own_tables})))  # own tables: both biases
    per_block = BEiT(BEiTConfig(**{**TINY, "use_shared_rel_pos_bias": False, "use_rel_pos_bias": True})).eval()
    per_block.load_state_dict(per_block_from_shared(shared.state_dict()))
    images, mask, _ = _inputs()
    torch.testing.assert_close(per_block.forward_features(images, mask), shared.forward_features(images, mask))


def _original_state(model: BEiT) -> dict:
    """Our state dict with the index buffers the original saves."""
    state = dict(model.state_dict())
    grid = model.grid
    if model.rel_pos_bias is not None:
        state["rel_pos_bias.relative_position_index"] = relative_position_index(grid)
    for i, block in enumerate(model.blocks):
        if block.attn.relative_position_bias_table is not None:
            state[f"blocks.{i}.attn.relative_position_index"] = relative_position_index(grid)
    return state


@pytest.mark.parametrize("flags", [dict(), dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=True),
                                   dict(use_rel_pos_bias=True, attn_head_dim=4, qkv_bias=False, init_values=None)])
def test_original_checkpoint_round_trip(tmp_path, flags):
    model = _perturbed(BEiT(BEiTConfig(**{**TINY, **flags})))
    path = atomic_save({"model": _original_state(model)}, tmp_path / "beit.pth")
    loaded = load_original_beit(path).eval()
    assert loaded.config.num_heads == 4 and loaded.config.img_size == 32 and loaded.config.depth == 2
    images, mask, _ = _inputs()
    torch.testing.assert_close(loaded.forward_features(images, mask), model.forward_features(images, mask))
    info, state = beit_from_original(_original_state(model))  # a bare state dict works too
    assert not any(k.endswith("relative_position_index") for k in state) and info["vocab_size"] == 16
    broken = _original_state(model)
    broken.pop("blocks.1.norm1.weight")
    atomic_save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"blocks\.1\.norm1\.weight"):
        load_original_beit(tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="lm_head.weight"):
        beit_from_original({k: v for k, v in state.items() if not k.startswith("lm_head")})


def test_a_position_table_of_no_square_grid_is_named_not_built_at_its_floor():
    """Without a relative table the grid comes from pos_embed: 20 patches are no square grid, and the root's floor
    (4x4) would build a BEiT the table does not fit."""
    state = _original_state(BEiT(BEiTConfig(**{**TINY, "use_shared_rel_pos_bias": False, "use_abs_pos_emb": True})))
    assert beit_from_original(state)[0]["img_size"] == 32
    state["pos_embed"] = torch.zeros(1, 21, 32)
    with pytest.raises(ValueError, match=r"pos_embed holds 20 patches, not a square grid; a BEiT takes square"):
        beit_from_original(state)


@pytest.mark.parametrize("per_block, abs_pos", [(False, False), (True, False), (False, True)])
def test_timm_beit_gives_equal_features(per_block, abs_pos):
    from functools import partial

    from timm.models.beit import Beit

    model = _perturbed(BEiT(BEiTConfig(**{**TINY, "init_values": 0.1, "use_abs_pos_emb": abs_pos})))
    timm_model = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0,
                      global_pool="", use_abs_pos_emb=abs_pos, use_shared_rel_pos_bias=not per_block,
                      use_rel_pos_bias=per_block, init_values=0.1,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    timm_model.load_state_dict(beit_to_timm(model.state_dict(), per_block=per_block), strict=True)
    images, _, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(images), model.forward_features(images),
                                   atol=1e-5, rtol=1e-5)
