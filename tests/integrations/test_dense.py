"""Dense prediction: the ViTDet feature pyramid and the detectron2 / mmsegmentation backbones."""

import re

import pytest
import torch

from lomar import VisionTransformer, ViTConfig, export_encoder
from lomar.integrations.dense import MultiLevelBackbone, ViTDetBackbone, with_rel_pos
from lomar.models.backbones import ShapeSpec, SimpleFeaturePyramid, feature_maps

# Tiny width and depth: a 1024-px image is a 64x64 grid of 4096 tokens with global attention.
TINY = ViTConfig(img_size=224, patch_size=16, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return VisionTransformer(TINY).eval()


@torch.no_grad()
def test_vitdet_pyramid_shapes_at_1024():
    torch.manual_seed(0)
    one_block = VisionTransformer(ViTConfig(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2))
    backbone = ViTDetBackbone(one_block, out_channels=16, top_block=True).eval()
    out = backbone(torch.randn(1, 3, 1024, 1024))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (1, 16, 256, 256), "p3": (1, 16, 128, 128), "p4": (1, 16, 64, 64),
        "p5": (1, 16, 32, 32), "p6": (1, 16, 16, 16)}
    assert backbone.output_shape() == {"p2": {"channels": 16, "stride": 4}, "p3": {"channels": 16, "stride": 8},
                                       "p4": {"channels": 16, "stride": 16}, "p5": {"channels": 16, "stride": 32},
                                       "p6": {"channels": 16, "stride": 64}}
    assert backbone.size_divisibility == 64
    assert all(torch.isfinite(v).all() for v in out.values())


def test_output_shape_reads_as_detectron2s_shape_specs():
    """detectron2's heads and FPN read output_shape()[name].channels and .stride (its Backbone gives ShapeSpecs and
    nothing wraps a dict): plain dicts failed there with an AttributeError."""
    backbone = ViTDetBackbone(VisionTransformer(ViTConfig(img_size=32, patch_size=16, embed_dim=32, depth=1,
                                                          num_heads=2)), out_channels=16, top_block=True)
    shapes = backbone.output_shape()
    assert [(s.channels, s.stride, s.height, s.width) for s in shapes.values()] == [
        (16, 4, None, None), (16, 8, None, None), (16, 16, None, None), (16, 32, None, None), (16, 64, None, None)]
    assert shapes["p2"] == {"channels": 16, "stride": 4}
    # built by hand as detectron2's configs build a box head's: every field given is read, the others are None
    box = ShapeSpec(channels=256, height=7, width=7)
    assert (box.channels, box.height, box.width, box.stride) == (256, 7, 7, None)


@torch.no_grad()
def test_any_size_divisible_by_the_patch(encoder):
    backbone = ViTDetBackbone(encoder, out_channels=8).eval()
    out = backbone(torch.randn(2, 3, 512, 384))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(128, 96), (64, 48), (32, 24), (16, 12)]
    assert list(out) == ["p2", "p3", "p4", "p5"]


@torch.no_grad()
def test_multilevel_backbone_for_mmseg(encoder):
    x = torch.randn(1, 3, 256, 320)
    maps = MultiLevelBackbone(encoder, out_indices=(0, 1, -1, -1)).eval()(x)
    assert [tuple(m.shape) for m in maps] == [(1, 32, 16, 20)] * 4
    pyramid = MultiLevelBackbone(encoder, out_indices=(0, 1, 1, 1), pyramid=True).eval()(x)
    assert [tuple(m.shape[-2:]) for m in pyramid] == [(64, 80), (32, 40), (16, 20), (8, 10)]
    with pytest.raises(ValueError, match="out of range"):
        MultiLevelBackbone(encoder, out_indices=(0, 5))


@torch.no_grad()
def test_feature_maps_are_the_encoder_tokens(encoder):
    x = torch.randn(2, 3, 64, 96)
    (last,) = feature_maps(encoder, x)
    tokens = encoder.forward_features(x)[:, 1:]
    assert torch.equal(last.flatten(2).transpose(1, 2), tokens)


def test_backward_and_gradient_checkpointing(encoder):
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(1)
    plain = ViTDetBackbone(encoder, out_channels=8).train()
    torch.manual_seed(1)
    ckpt = ViTDetBackbone(encoder, out_channels=8, grad_checkpointing=True).train()
    grads = []
    for backbone in (plain, ckpt):
        backbone.zero_grad()
        sum(v.square().mean() for v in backbone(x).values()).backward()
        grads.append(backbone.encoder.blocks[0].attn.rpe.table.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_pyramid_levels_follow_the_patch_size():
    pyramid = SimpleFeaturePyramid(32, 8, in_stride=8)
    assert pyramid.strides == {"p1": 2, "p2": 4, "p3": 8, "p4": 16}
    with pytest.raises(ValueError, match="scale factor"):
        SimpleFeaturePyramid(32, 8, scale_factors=(3.0,))


@torch.no_grad()
def test_backbone_from_export_and_mae_encoder(tmp_path):
    mae_encoder = VisionTransformer(ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                              pos="abs"), num_classes=3)
    export_encoder(mae_encoder, tmp_path / "exp")
    backbone = ViTDetBackbone(tmp_path / "exp", out_channels=8).eval()
    assert backbone.encoder.num_classes == 0  # the classifier head is not part of the backbone
    for named in (ViTDetBackbone(encoder=tmp_path / "exp"), MultiLevelBackbone(encoder=tmp_path / "exp",
                                                                              out_indices=(0,))):
        assert named.encoder.num_classes == 0  # the source by its keyword, as the models' backbones name it
    out = backbone(torch.randn(1, 3, 128, 96))  # absolute table interpolated to the 8x6 grid
    assert tuple(out["p5"].shape) == (1, 8, 4, 3)


def test_feature_map_indices_outside_the_encoder_are_refused(encoder):
    depth, x = len(encoder.blocks), torch.randn(1, 3, 64, 64)
    assert [m.shape for m in feature_maps(encoder, x, indices=depth - 1)] == [m.shape for m in feature_maps(encoder, x)]
    for bad in ((depth,), (-depth - 1,), ()):
        with pytest.raises(ValueError, match="must be block indices"):
            feature_maps(encoder, x, indices=bad)


def test_a_whole_pretraining_model_gives_its_encoder(tmp_path):
    from lomar import LoMaR

    model = LoMaR(ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2), 3, 2)
    assert ViTDetBackbone(model, window_size=0).encoder.embed_dim == 32
    export_encoder(model, tmp_path / "exp")  # its encoder
    assert (tmp_path / "exp" / "model.safetensors").is_file()
    with pytest.raises(TypeError, match="no lomar ViT encoder"):
        ViTDetBackbone(torch.nn.Linear(2, 2))
    # the models' own backbones take a built encoder, and name the loader of the others
    from lomar.models import backbones

    for source in (tmp_path / "exp", model):
        with pytest.raises(TypeError, match=r"^a dense backbone takes a lomar VisionTransformer, got \w+; "
                                            r"lomar\.dense\.load_encoder reads one"):
            backbones.ViTDetBackbone(source)
    with pytest.raises(ValueError, match="must be a file name"):
        export_encoder(model, tmp_path / "sub", weights_name="sub/x.safetensors")


def test_a_backbone_trains_an_absolute_table_whatever_form_the_encoder_came_in(tmp_path):
    from lomar import MAE

    mae = MAE(ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, pos="abs"),
              decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    assert not mae.encoder.pos_embed.requires_grad  # pretraining keeps it fixed
    assert ViTDetBackbone(mae, window_size=0).encoder.pos_embed.requires_grad
    assert MultiLevelBackbone(mae, out_indices=(0, 1)).encoder.pos_embed.requires_grad
    # train_pos_embed=False: fixed, both for the encoder as it came and for one the layout rebuilt
    for backbone in (ViTDetBackbone(mae, train_pos_embed=False),
                     ViTDetBackbone(mae, window_size=2, train_pos_embed=False),
                     MultiLevelBackbone(mae, out_indices=(0, 1), train_pos_embed=False)):
        assert not backbone.encoder.pos_embed.requires_grad


def test_a_layout_change_keeps_the_encoders_frozen_weights_dtype_and_mode():
    """window_size / global_blocks / attention rebuild the encoder: it came back trainable, fp32 and in train mode
    whatever the encoder given, so a frozen backbone trained and a bf16 one refused bf16 images."""
    encoder = VisionTransformer(ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2))
    encoder.requires_grad_(False)
    built = ViTDetBackbone(encoder.bfloat16().eval(), out_channels=8, window_size=2, global_blocks=(1,)).encoder
    assert built.config.window_size == 2 and built is not encoder
    assert not any(param.requires_grad for param in built.parameters())
    assert {param.dtype for param in built.parameters()} == {torch.bfloat16} and not built.training
    with torch.no_grad():
        assert feature_maps(built, torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))[0].dtype == torch.bfloat16


@torch.no_grad()
def test_an_empty_batch_gives_empty_outputs_of_every_shape(encoder):
    # A batch of 0 is valid (an empty shard, a filtered batch); reshapes that inferred a size from
    # 0 elements (view(..., -1)) refused it.
    import timm

    import lomar.timm_models  # noqa: F401

    empty = torch.randn(0, 3, 64, 64)
    assert tuple(encoder.forward_features(empty).shape) == (0, 17, 32)
    assert tuple(encoder(empty).shape) == (0, 32)
    pyramid = ViTDetBackbone(encoder, out_channels=8).eval()(empty)
    assert {k: tuple(v.shape) for k, v in pyramid.items()} == {
        "p2": (0, 8, 16, 16), "p3": (0, 8, 8, 8), "p4": (0, 8, 4, 4), "p5": (0, 8, 2, 2)}
    assert [tuple(m.shape) for m in feature_maps(encoder, empty, (0, 1))] == [(0, 32, 4, 4)] * 2
    tm = timm.create_model("lomar_vit_mini_patch16", img_size=64, depth=1).eval()
    assert [tuple(m.shape) for m in tm.forward_intermediates(empty, intermediates_only=True)] == [(0, 128, 4, 4)]


@pytest.mark.parametrize("build, named", [
    (lambda e: ViTDetBackbone(e, out_channels="256"), "out_channels must be a positive integer (channels), got '256'"),
    (lambda e: ViTDetBackbone(e, out_channels=0), "out_channels must be a positive integer (channels), got 0"),
    (lambda e: MultiLevelBackbone(e, out_indices="1"), "out_indices must be a sequence of block indices (integers)"),
    (lambda e: MultiLevelBackbone(e, out_indices=1), "out_indices must be a sequence of block indices"),
    (lambda e: MultiLevelBackbone(e, out_indices=()), "out_indices must be a sequence of block indices"),
    (lambda e: with_rel_pos("export/", "auto", "bias"), "with_rel_pos takes a lomar VisionTransformer"),
])
def test_backbone_arguments_are_named(encoder, build, named):
    # Before: zero-channel convolutions built silently, "not all arguments converted during string
    # formatting", "'<=' not supported between 'int' and 'str'", "'str' object has no attribute 'config'".
    with pytest.raises((ValueError, TypeError)) as info:
        build(encoder)
    assert named in str(info.value)
    assert MultiLevelBackbone(encoder, out_indices=(i for i in (0, 1))).out_indices == (0, 1)


@pytest.mark.parametrize("kwargs, named", [
    (dict(in_channels=3), "scale factor 4 upsamples into in_channels // 4 channels: in_channels must be at least 4"),
    (dict(in_channels=1, scale_factors=(2.0, 1.0)), "in_channels must be at least 2, got 1"),
    (dict(in_channels=16, scale_factors=(4.0, 4.0)), "scale_factors must be distinct"),
    (dict(in_channels=16, scale_factors=()), "scale_factors must be distinct factors among 4, 2, 1 and 0.5, at least"),
    (dict(in_channels=16, in_stride=0), "in_stride must be a positive integer"),
])
def test_a_pyramid_that_cannot_be_built_is_named_when_built(kwargs, named):
    """Fewer than 4 channels built, then failed in forward (torch: 'non-empty 2D or 4D weight tensor expected');
    a repeated factor built a level no output name reached (its weights never trained); stride 0 was
    'math domain error'."""
    with pytest.raises(ValueError, match=re.escape(named)):
        SimpleFeaturePyramid(out_channels=8, **kwargs)


def test_pyramid_names_tokens_given_for_a_map():
    # torch said "expected input[1, 1, 17, 32] to have 32 channels, but got 1 channels instead"
    with pytest.raises(ValueError, match=r"takes a map \(B, 32, h, w\), got \(1, 17, 32\); .*dense\.feature_maps"):
        SimpleFeaturePyramid(32, 8)(torch.randn(1, 17, 32))


def test_a_beit_encoder_is_refused_with_the_ways_it_loads(tmp_path):
    """A BEiT export is an export folder: 'pass an export folder' told its user nothing."""
    from lomar.checkpoints.export_beit import export_beit_encoder
    from lomar.integrations.dense import load_encoder
    from lomar.models.beit import BEiT, BEiTConfig

    beit = BEiT(BEiTConfig(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, vocab_size=4))
    export_beit_encoder(beit, tmp_path / "beit")
    with pytest.raises(TypeError, match=re.escape(f"{tmp_path / 'beit'} holds a BEiT encoder; lomar.dense takes LoMaR "
                                                  f"/ MAE ViT encoders only") + ".* timm.create_model" +
                       re.escape(f"('local-dir:{tmp_path / 'beit'}', pretrained=True)")):
        load_encoder(tmp_path / "beit")
    with pytest.raises(TypeError, match=r"^this model holds a BEiT encoder.*local-dir:DIR"):
        load_encoder(beit)
