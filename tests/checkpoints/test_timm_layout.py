"""timm's ViT layouts as `--pretrained` (load_pretrained_encoder, the reader of knn / linprobe / finetune / detect /
segment) and `lomar load-original` (load_original) read them: the same features as timm's own model, or a one-line
refusal naming what the file holds."""

from __future__ import annotations

import logging

import pytest
import timm
import torch

from lomar import VisionTransformer, ViTConfig
from lomar.checkpoints.formats import load_model
from lomar.checkpoints.io import atomic_save
from lomar.checkpoints.original import load_original
from lomar.eval.features import load_pretrained_encoder

TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, num_classes=0)


def _timm_vit(tmp_path, **kwargs):
    """A tiny timm ViT of the layout ``kwargs`` with weights far from their initial values (a layer scale of 1e-5
    would hide a wrongly folded one), saved as timm saves one; -> (model, file)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **{**TINY, **kwargs}).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.1, 0.3)
    path = tmp_path / "vit.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _images(model):
    torch.manual_seed(1)
    return torch.randn(2, 3, *model.patch_embed.img_size)


def _readers(path, **overrides):
    return {"load_pretrained_encoder": load_pretrained_encoder(path, num_heads=2, **overrides),
            "load_original": load_original(path, num_heads=2, **overrides)}


@pytest.mark.parametrize("layout", [dict(), dict(dynamic_img_size=True), dict(qkv_bias=False),
                                    dict(init_values=1e-5), dict(no_embed_class=True, init_values=1e-5),
                                    dict(no_embed_class=True, qkv_bias=False), dict(proj_bias=False),
                                    dict(proj_bias=False, qkv_bias=False, init_values=1e-5)],
                         ids=["plain", "dynamic_img_size", "qkv_bias=False", "layer_scale", "deit3_like",
                              "no_embed_class_no_qkv_bias", "proj_bias=False", "no_biases_layer_scale"])
def test_a_timm_layout_lomar_holds_gives_timms_features(tmp_path, layout):
    model, path = _timm_vit(tmp_path, **layout)
    images = _images(model)
    with torch.no_grad():
        expected = model.forward_features(images)
        for name, ours in _readers(path).items():
            torch.testing.assert_close(ours.eval().forward_features(images), expected, atol=1e-5, rtol=0,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_a_timm_classifier_with_layer_scale_and_no_class_entry_gives_timms_logits(tmp_path, pool):
    """DeiT III's classifier layout (a cls-token head; fc_norm's mean too): load_model and load_original build the
    classifier itself."""
    model, path = _timm_vit(tmp_path, num_classes=5, global_pool=pool, no_embed_class=True, init_values=1e-5)
    images = _images(model)
    with torch.no_grad():
        for ours in (load_model(path, num_heads=2), load_original(path, num_heads=2)):
            torch.testing.assert_close(ours.eval()(images), model(images), atol=1e-5, rtol=0)


def test_a_timm_avg_pool_encoder_keeps_its_blocks_and_leaves_fc_norm_out(tmp_path, caplog):
    """global_pool='avg' (num_classes=0): timm's fc_norm follows the pooling and its final norm is identity; lomar's
    encoder has a final norm (fresh) and no fc_norm: the blocks are timm's, which its forward_features returns."""
    model, path = _timm_vit(tmp_path, global_pool="avg")
    images = _images(model)
    with caplog.at_level(logging.WARNING, logger="lomar.checkpoints"), torch.no_grad():
        for ours in _readers(path).values():
            torch.testing.assert_close(ours.forward_blocks(*ours.embed(images)), model.forward_features(images),
                                       atol=1e-5, rtol=0)
    assert "its fc_norm (timm's global_pool='avg' norm after pooling, which no head follows) is left out" in caplog.text


@pytest.mark.parametrize("read", [load_pretrained_encoder, load_original], ids=lambda f: f.__name__)
def test_register_tokens_are_refused_naming_them(tmp_path, read):
    _, path = _timm_vit(tmp_path, reg_tokens=4)
    with pytest.raises(ValueError, match=rf"^{path} holds 4 register tokens \(reg_token: timm's reg_tokens=4, as "
                                         rf"DINOv2 with registers and vit_\*_reg4_\* have\), which lomar's ViT \(a "
                                         rf"class token and the patch tokens\) does not hold; pass a ViT without "
                                         rf"register tokens$"):
        read(path, num_heads=2)


@pytest.mark.parametrize("read", [load_pretrained_encoder, load_original], ids=lambda f: f.__name__)
def test_no_class_token_on_a_non_square_grid_is_refused_as_such(tmp_path, read):
    """class_token=False at 32x48 px: its 24-entry table is no square grid, which is not what the file lacks."""
    _, path = _timm_vit(tmp_path, class_token=False, global_pool="avg", img_size=(32, 48))
    with pytest.raises(ValueError, match=rf"^{path} holds a position table but no cls_token: a ViT without a class "
                                         rf"token \(timm's class_token=False\)"):
        read(path, num_heads=2)


def test_a_square_table_without_a_size_is_read_as_no_embed_class_in_timms_weights_saying_so(tmp_path, caplog):
    """Layer scale is no lomar model's: its 16-entry table is read as timm's, and the other reading named."""
    _timm_vit(tmp_path, no_embed_class=True, init_values=1e-5)
    path = tmp_path / "vit.pth"
    with caplog.at_level(logging.WARNING, logger="lomar.checkpoints"):
        load_pretrained_encoder(path, num_heads=2)
    assert (f"{path}: its position table of 16 entries and its cls_token are read as timm's no_embed_class=True (a "
            f"4x4 grid, no position for the class token); one of a class entry and a 15-patch grid is read at the "
            f"size it was trained at: lomar export {path} --img-size HEIGHT WIDTH --to DIR") in caplog.text


def test_a_plain_no_embed_class_table_asks_for_its_size_naming_both_readings_and_reads_at_it(tmp_path):
    """Keys as lomar's and a 16-entry table: a 4x4 grid without a class entry, or lomar's class entry and 15 patches
    (a 3x5 grid); no size saved or given, neither is guessed, and the size the refusal names reads it."""
    model, path = _timm_vit(tmp_path, no_embed_class=True)
    both = (r"holds 15 patches, not a square grid, and .* \(its 16 entries are also a 4x4 grid without a class entry, "
            r"timm's no_embed_class=True, which {} reads\)$")
    with pytest.raises(ValueError, match=both.format("--img-size 32")):
        load_pretrained_encoder(path, num_heads=2)
    with pytest.raises(ValueError, match=both.format("img_size=32")):
        load_original(path, num_heads=2)
    images = _images(model)
    with torch.no_grad():  # load_model: lomar export --img-size 32's reading
        for read in (load_original, load_model):
            ours = read(path, num_heads=2, img_size=32).eval()
            torch.testing.assert_close(ours.forward_features(images), model.forward_features(images), atol=1e-5,
                                       rtol=0)


def test_a_given_size_tells_a_class_entry_and_a_non_square_grid_from_no_embed_class(tmp_path):
    """16 entries are a 4x4 grid without a class entry, or a class entry and a 3x5 grid: the size given decides, and
    lomar's own layout at 24x40 px stays as it is (no zero entry put first)."""
    model, path = _timm_vit(tmp_path, img_size=(24, 40))
    assert model.pos_embed.shape[1] == 16
    images = _images(model)
    with torch.no_grad():
        ours = load_original(path, num_heads=2, img_size=(24, 40)).eval()
        torch.testing.assert_close(ours.forward_features(images), model.forward_features(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.pos_embed, model.pos_embed)


def test_a_non_square_no_embed_class_table_is_read_at_the_size_given(tmp_path):
    """24 entries at 32x48 px: no square either way, so the size is asked for, and given, it tells the table has no
    class entry (4x6 cells, not 1 + 23)."""
    model, path = _timm_vit(tmp_path, no_embed_class=True, img_size=(32, 48))
    images = _images(model)
    with torch.no_grad():
        ours = load_original(path, num_heads=2, img_size=(32, 48)).eval()
        torch.testing.assert_close(ours.forward_features(images), model.forward_features(images), atol=1e-5, rtol=0)


def test_a_given_size_does_not_turn_a_table_its_saved_size_reads_as_lomars_into_timms(tmp_path):
    """A class entry and a 3x5 grid (24x40 px, saved) are 16 entries, a 4x4 grid's: img_size=32 given to
    load_original contradicts the saved size and is refused as such, not read as a no_embed_class table."""
    config = ViTConfig(img_size=(24, 40), patch_size=8, embed_dim=32, depth=2, num_heads=2, pos="abs")
    atomic_save({"model": VisionTransformer(config).state_dict(), "config": config.to_dict()}, tmp_path / "v.pt")
    with pytest.raises(ValueError, match=r"size mismatch for pos_embed"):
        load_original(tmp_path / "v.pt", num_heads=2, img_size=32)


@pytest.mark.parametrize("layout, named", [
    (dict(pre_norm=True), r"pre_norm=True \(norm_pre: a norm before the blocks, as CLIP's\)"),
    (dict(qk_norm=True), r"qk_norm=True \(attn.q_norm / k_norm: a norm of the queries and keys\)"),
    (dict(global_pool="map"), r"global_pool='map' \(attn_pool: attention pooling, as SigLIP's\)")],
    ids=["pre_norm", "qk_norm", "map"])
@pytest.mark.parametrize("read", [load_pretrained_encoder, load_original], ids=lambda f: f.__name__)
def test_a_layout_lomars_vit_does_not_hold_is_refused_naming_it(tmp_path, layout, named, read):
    _, path = _timm_vit(tmp_path, **layout)
    with pytest.raises(ValueError, match=rf"^{path} is a timm ViT of {named}, which lomar's ViT does not hold; pass a "
                                         rf"ViT without it$"):
        read(path, num_heads=2)


@pytest.mark.parametrize("read", [load_model, load_original], ids=lambda f: f.__name__)
def test_lomars_keys_read_as_no_embed_class_at_a_size_given_say_the_other_reading(tmp_path, caplog, read):
    """A class entry and a 3x5 grid (24x40 px), saved with no size, are 16 entries, a 4x4 grid's: img_size=32 given
    reads them as timm's, which the keys (lomar's own) do not tell, so it is said."""
    config = ViTConfig(img_size=(24, 40), patch_size=8, embed_dim=32, depth=2, num_heads=2, pos="abs")
    atomic_save({"model": VisionTransformer(config).state_dict()}, path := tmp_path / "v.pt")
    with caplog.at_level(logging.WARNING, logger="lomar.checkpoints"):
        read(path, num_heads=2, img_size=32)
    assert (f"{path}: its position table of 16 entries is read at the img_size given as timm's no_embed_class=True (a "
            f"4x4 grid, no position for the class token); lomar's own layout of a class entry and a 15-patch grid is "
            f"read at the size it was trained at") in caplog.text
