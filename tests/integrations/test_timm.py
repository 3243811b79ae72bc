"""The timm registration's weight filter (lomar.integrations.timm.checkpoint_filter_fn) on weights of another model."""

import numpy as np
import pytest
import torch

from lomar import VisionTransformer, ViTConfig, export_encoder

timm = pytest.importorskip("timm")
import lomar.integrations.timm  # noqa: E402,F401  (registers lomar_vit_* in timm)

MAE_LIKE = ViTConfig(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, pos="abs")


@pytest.mark.parametrize("pos", ["rpe", "none"])
def test_weights_of_another_position_encoding_name_the_pos_to_pass(tmp_path, pos):
    """README's pretrained_cfg_overlay route builds an RPE model unless told: an MAE export's weights then read 'the
    weights lack blocks.0.attn.rpe.table' (no word of pos), and a pos='none' model took them silently, its absolute
    table dropped."""
    source = VisionTransformer(MAE_LIKE).eval()
    with torch.no_grad():
        source.pos_embed.add_(torch.randn_like(source.pos_embed))  # a trained table, not the sin-cos one a build gives
    export_encoder(source, tmp_path)
    create = dict(embed_dim=32, depth=1, num_heads=2, img_size=32,
                  pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))
    with pytest.raises(ValueError, match=f"positions with pos='abs', this model with pos='{pos}'; pass pos='abs'"):
        timm.create_model("lomar_vit_tiny_patch16", pretrained=True, pos=pos, **create)
    model = timm.create_model("lomar_vit_tiny_patch16", pretrained=True, pos="abs", **create).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), source.forward_features(x))


def test_beit_weights_are_named_as_beits_not_read_as_a_vits(tmp_path):
    """A BEiT export's weights into a lomar_vit_* model read as a ViT without positions: 'pass pos='none'', which
    then failed on their q/v biases."""
    from lomar.checkpoints.export_beit import export_beit_encoder
    from lomar.models.beit import BEiT, BEiTConfig

    export_beit_encoder(BEiT(BEiTConfig(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                        vocab_size=16)), tmp_path)
    for pos in ("rpe", "none"):
        with pytest.raises(ValueError, match=r"these are BEiT weights .*: timm.create_model\('local-dir:DIR'"):
            timm.create_model("lomar_vit_tiny_patch16", pretrained=True, embed_dim=32, depth=1, num_heads=2, pos=pos,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "encoder.safetensors")))


def test_a_size_pair_is_taken_as_a_vitconfig_takes_one():
    """timm hands img_size as (height, width): a square pair is the int an export's config.json saves, a pair of
    floats is refused as 32.5 alone is, not truncated to 32."""
    from lomar.integrations.timm import LomarVisionTransformer

    shape = dict(patch_size=16, embed_dim=32, depth=1, num_heads=2)
    assert LomarVisionTransformer(img_size=(np.int64(32), 32), **shape).config.img_size == 32
    assert LomarVisionTransformer(img_size=[32, 64], **shape).config.img_size == (32, 64)
    with pytest.raises(ValueError, match=r"ViTConfig\.img_size must be a positive integer \(or a \(height, width\) "
                                         r"pair\), got \(32\.5, 32\.5\)"):
        LomarVisionTransformer(img_size=(32.5, 32.5), **shape)


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_a_classifiers_weights_loaded_by_name_keep_their_head(tmp_path, pool):
    """README's pretrained_cfg_overlay route built the name's encoder (num_classes 0) and dropped a classifier
    export's head without a word unless the caller knew to pass num_classes (and global_pool='token' for cls)."""
    from lomar.checkpoints.formats import load_model

    torch.manual_seed(0)
    source = VisionTransformer(MAE_LIKE, num_classes=3, global_pool=pool)
    with torch.no_grad():
        source.head.weight.normal_()
    export_encoder(source, tmp_path)
    create = dict(embed_dim=32, depth=1, num_heads=2, img_size=32, pos="abs",
                  pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))
    model = timm.create_model("lomar_vit_tiny_patch16", pretrained=True, **create).eval()
    assert model.num_classes == model.pretrained_cfg["num_classes"] == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), load_model(tmp_path).eval()(x))
        # the caller's choice wins: no head, or a fresh one of another size
        assert timm.create_model("lomar_vit_tiny_patch16", pretrained=True, num_classes=0, **create)(x).shape == (2, 32)
        assert timm.create_model("lomar_vit_tiny_patch16", pretrained=True, num_classes=7, **create)(x).shape == (2, 7)


def test_the_head_guess_refuses_no_weights_that_the_load_takes(tmp_path):
    """The guess of a classifier's head read the weights' header with the export reader's checks: a file holding an
    integer tensor that the load drops (a decoder's) was refused ('holds tensors in a dtype no weights are saved
    in'), and BEiT weights with their index table were told to re-export, not to load them as timm's Beit."""
    from safetensors.torch import load_file, save_file

    from lomar.checkpoints.export_beit import export_beit_encoder
    from lomar.models.beit import BEiT, BEiTConfig

    source = VisionTransformer(MAE_LIKE).eval()
    export_encoder(source, tmp_path / "vit")
    index = torch.arange(4)
    save_file({**load_file(str(tmp_path / "vit" / "model.safetensors")), "decoder_index": index},
              str(tmp_path / "indexed.safetensors"))
    shape = dict(embed_dim=32, depth=1, num_heads=2, img_size=32)
    model = timm.create_model("lomar_vit_tiny_patch16", pretrained=True, pos="abs", **shape,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "indexed.safetensors"))).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    export_beit_encoder(BEiT(BEiTConfig(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                        vocab_size=16)), tmp_path / "beit")
    save_file({**load_file(str(tmp_path / "beit" / "encoder.safetensors")),
               "blocks.0.attn.relative_position_index": index}, str(tmp_path / "beit.safetensors"))
    with pytest.raises(ValueError, match=r"these are BEiT weights .*: timm.create_model\('local-dir:DIR'"):
        timm.create_model("lomar_vit_tiny_patch16", pretrained=True, pos="none", **shape,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "beit.safetensors")))


@pytest.mark.parametrize("pos", ["abs", "none", "rpe", "windowed"])
def test_an_export_loads_into_timms_own_vit_as_readme_says(tmp_path, pos):
    """README: an export's names are timm's VisionTransformer's; an MAE (pos='abs') or pos='none' export loads strictly
    into timm's own ViT of its size (for 'none': pos_embed='none') with lomar's features, and a LoMaR one holds
    exactly one tensor more per block, iRPE's table, which timm's ViT has no place for. A windowed one loads
    strictly, but timm attends globally: other features."""
    from safetensors.torch import load_file

    windows = dict(window_size=1, global_blocks=(1,)) if pos == "windowed" else {}
    pos = "abs" if windows else pos
    source = VisionTransformer(ViTConfig(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, pos=pos,
                                         **windows))
    with torch.no_grad():
        for weight in source.parameters():
            weight.add_(torch.randn_like(weight) * 0.1)
    export_encoder(source.eval(), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                              global_pool="token", **({} if pos == "abs" else {"pos_embed": "none"})).eval()
    rpe = {k for k in state if k.endswith(".attn.rpe.table")}
    assert rpe == ({"blocks.0.attn.rpe.table", "blocks.1.attn.rpe.table"} if pos == "rpe" else set())
    model.load_state_dict({k: v for k, v in state.items() if k not in rpe}, strict=True)
    pooled = timm.create_model("vit_tiny_patch16_224", img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                               global_pool="avg", fc_norm=False, **({} if pos == "abs" else {"pos_embed": "none"}))
    pooled.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if pos != "rpe" and not windows:
            torch.testing.assert_close(model.forward_features(x), source.forward_features(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pooled.eval()(x), source(x), rtol=1e-5, atol=1e-5)
        else:  # the same weights without relative position, or without windows: other features
            assert not torch.allclose(model.forward_features(x), source.forward_features(x), atol=1e-3)


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_a_classifier_export_loads_into_timms_own_vit_with_its_head_when_the_overlay_counts_it(tmp_path, pool):
    """README: timm's own ViT keeps a classifier export's head when num_classes is in pretrained_cfg_overlay too
    (its own cfg counts 1000 rows, so it would drop a 5-row head and start a fresh one)."""
    config = ViTConfig(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, pos="abs")
    source = VisionTransformer(config, num_classes=5, global_pool=pool)
    with torch.no_grad():
        source.head.weight.normal_()
    export_encoder(source.eval(), tmp_path)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                              global_pool={"cls": "token"}.get(pool, pool), pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"), num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source(x), rtol=1e-5, atol=1e-5)
