"""What the model API refuses, named by its Python parameters (not the commands' flags): unknown models and heads,
configs that build no encoder, inputs that are no batch of images, wrong window requests, MAE's noise, generator and
decoder sizes, and values of the wrong type (numpy numbers taken, model names or dicts as configs named)."""

import numpy as np
import pytest
import torch
from tiny_widths import TINY

import lomar
from lomar import MAE, LoMaR, MaskingPlan, VisionTransformer, ViTConfig, model_config


def test_unknown_model_and_heads():
    with pytest.raises(ValueError, match="unknown model 'vit_giant_patch16'"):
        model_config("vit_giant_patch16")
    with pytest.raises(ValueError, match="not divisible by num_heads 5; pick a divisor of"):
        VisionTransformer(ViTConfig(embed_dim=24, depth=1, num_heads=5))
    with pytest.raises(ValueError, match="position encoding"):
        VisionTransformer(ViTConfig(embed_dim=24, depth=1, num_heads=2, pos="learned"))


@pytest.mark.parametrize("key, fix", [("image_size", "did you mean img_size=?"),  # timm's and Hugging Face's name
                                      ("num_classes", "lomar.VisionTransformer(config, num_classes=...)")])
def test_model_config_names_a_keyword_that_is_no_config_field_and_the_fix(key, fix):
    # dataclasses' own error: "ViTConfig.__init__() got an unexpected keyword argument 'image_size'"
    with pytest.raises(TypeError) as info:
        model_config("vit_mini_patch8", **{key: 64})
    message = str(info.value)
    assert message.startswith(f"model_config got {key}=64, which is no ViTConfig field (fields: img_size, ")
    assert message.endswith(fix)


def test_model_build_errors_name_the_python_parameters_not_flags():
    """A Python caller passed global_blocks, img_size, decoder_num_heads: the commands reword them as flags."""
    config = ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, window_size=2,
                       global_blocks=(1, 5))
    cases = [(lambda: VisionTransformer(config), r"global blocks \[5\] are not blocks of this 2-block encoder "
                                                 r"\(global_blocks takes indices 0..1\)"),
             (lambda: VisionTransformer(ViTConfig(img_size=(36, 32), patch_size=8, embed_dim=16, depth=1,
                                                  num_heads=2)),
              r"img_size 36x32 is not divisible by the encoder's patch_size 8; use a multiple of 8 \(e.g. 32x32\)"),
             (lambda: MAE(ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, pos="abs"),
                          decoder_embed_dim=100, decoder_depth=1, decoder_num_heads=16),
              "decoder_embed_dim 100 is not divisible by decoder_num_heads 16; pick a divisor of 100")]
    for build, words in cases:
        with pytest.raises(ValueError, match=words) as info:
            build()
        assert "--" not in str(info.value)


@pytest.mark.parametrize("images, words", [
    (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "images are torch.uint8 but the model's weights are"),
    (torch.randn(1, 3, 32, 32).half(), "images are torch.float16"),
    (torch.randn(1, 3, 32, 32).double(), "images are torch.float64"),
    (torch.randn(3, 32, 32), "expected images of shape (N, 3, H, W), got (3, 32, 32); add the batch dimension "
                             "(images[None])"),
    (torch.randn(2, 32, 32, 3), "got (2, 32, 32, 3); channels come first: images.permute(0, 3, 1, 2)"),
    (torch.randn(1, 3, 32, 32, device="meta"), "images are on meta but the model's weights are on cpu: move them "
                                               "with images.to('cpu')"),
])
def test_images_of_another_dtype_rank_layout_or_device_are_named(images, words):
    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    for model in (VisionTransformer(config), LoMaR(config, 3, 2)):
        with pytest.raises(ValueError) as info:
            model(images)
        assert words in str(info.value)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside: bf16 images are fine
        assert VisionTransformer(config)(torch.randn(1, 3, 32, 32).bfloat16()).shape == (1, 32)


@pytest.mark.parametrize("change, words", [
    (dict(num_heads=0), "ViTConfig.num_heads must be a positive integer, got 0"),
    (dict(depth=-1), "ViTConfig.depth must be a positive integer, got -1"),
    (dict(embed_dim=0), "ViTConfig.embed_dim must be a positive integer"),
    (dict(img_size="224"), "ViTConfig.img_size must be a positive integer (or a (height, width) pair), got '224'"),
    (dict(img_size=(32, 48, 64)), "ViTConfig.img_size must be"),
    (dict(img_size=(32,)), "ViTConfig.img_size must be"),
    (dict(depth=True), "ViTConfig.depth must be a positive integer, got True"),
    (dict(drop_path=2.0), "drop_path in [0, 1)"),
    (dict(embed_dim=100), "ViTConfig.embed_dim 100 is not divisible by num_heads 3; pick a divisor of 100"),
])
def test_a_config_that_builds_no_encoder_is_refused_on_construction(change, words):
    with pytest.raises(ValueError) as info:
        model_config("vit_tiny_patch16", **change)
    assert words in str(info.value)
    assert model_config("vit_tiny_patch16", img_size=[32, 48]).img_size == (32, 48)  # JSON's pair
    numpy_sized = model_config("vit_tiny_patch16", img_size=np.int64(32), depth=np.int64(2))
    assert (numpy_sized.img_size, numpy_sized.depth) == (32, 2) and type(numpy_sized.depth) is int


@pytest.mark.parametrize("call, words", [
    (lambda c: LoMaR(c, window_size=9), ["window_size=9", "8x8 patch grid", "pass window_size <= 8"]),
    (lambda c: LoMaR(c, window_size=7, num_windows=5), ["num_windows=5", "pass num_windows <= 4"]),
    (lambda c: LoMaR(c, window_size=3, num_windows=1, mask_ratio=1.2), ["mask_ratio=1.2", "pass mask_ratio in ["]),
    (lambda c: lomar.sample_plan(1, (8, 8), 7, 3, 0.8, placement="permutation"),
     ["num_windows=3", "pass num_windows <= 2, placement='distinct'"]),
    (lambda c: lomar.sample_plan(1, (8, 8), 3, 1, 0.8, placement="rows"), ["placement='rows'", "'distinct'"]),
])
def test_public_api_errors_name_its_parameters_not_flags(call, words):
    # `lomar pretrain` words them as its flags (lomar.errors.in_flags); a Python caller passed parameters
    config = model_config("vit_mini_patch8", img_size=64, depth=1)
    with pytest.raises(ValueError) as info:
        call(config)
    message = str(info.value)
    assert all(word in message for word in words) and "--" not in message, message


def test_forward_refuses_what_is_no_batch_of_images_at_the_entry():
    model = LoMaR(model_config("vit_mini_patch8", img_size=32, depth=1), window_size=3, num_windows=1)
    with pytest.raises(TypeError, match=r"images must be a torch.Tensor \(N, 3, H, W\), got ndarray; convert it "
                                        r"with torch.as_tensor\(images\)"):
        model(np.zeros((1, 3, 32, 32), dtype=np.float32))  # named at the entry, before the dtype check reads it
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        model.encoder([[0.0]])
    with pytest.raises(ValueError, match="LoMaR needs at least one image; got an empty batch"):
        model(torch.zeros(0, 3, 32, 32))  # said of the batch, not of num_images, a parameter the caller never passed


def test_window_requests_of_the_wrong_kind_are_named():
    with pytest.raises(ValueError, match="a 1x1 window cannot be partly masked"):
        lomar.sample_plan(2, (8, 8), 1, 1, 0.8)
    with pytest.raises(ValueError, match="window_size must be a positive integer, got 3.0"):
        lomar.sample_plan(2, (8, 8), 3.0, 1, 0.8)
    with pytest.raises(ValueError, match="num_windows must be a positive integer, got 2.0"):
        lomar.sample_plan(2, (8, 8), 3, 2.0, 0.8)
    plan = lomar.sample_plan(2, (8, 8), 3, 2, 0.8)
    empty = MaskingPlan(plan.top_left[:, :0], plan.mask[:, :0], 3)
    with pytest.raises(ValueError, match="with n >= 1 windows"):
        empty.validate((8, 8))
    # numpy's integers are sizes and counts, as in ViTConfig: the same plan, held as Python ints
    gen = torch.Generator().manual_seed(0)
    numpy_plan = lomar.sample_plan(2, (8, 8), np.int64(3), np.int32(2), 0.8, generator=gen)
    ints = lomar.sample_plan(2, (8, 8), 3, 2, 0.8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(numpy_plan.top_left, ints.top_left) and torch.equal(numpy_plan.mask, ints.mask)
    assert type(numpy_plan.window_size) is int
    with pytest.raises(ValueError, match="num_windows must be a positive integer, got True"):
        lomar.sample_plan(2, (8, 8), 3, True, 0.8)


@pytest.mark.parametrize("overrides, named", [
    (dict(window_size="14"), "ViTConfig.window_size must be an integer >= 0 (0: global attention), got '14'"),
    (dict(window_size=-1), "ViTConfig.window_size must be an integer >= 0"),
    (dict(global_blocks="25"), "ViTConfig.global_blocks must be a sequence of block indices (integers), got '25'"),
    (dict(global_blocks=2), "ViTConfig.global_blocks must be a sequence"),
    (dict(drop_path="0.1"), "drop_path in [0, 1), got 4.0 and '0.1'"),
    (dict(mlp_ratio="4"), "mlp_ratio > 0"),
])
def test_config_names_a_wrong_setting(overrides, named):
    # Unchecked, a str global_blocks would be read digit by digit ('25' -> blocks 2 and 5), and the others
    # would raise "'<' not supported between 'str' and 'int'" (or nothing until the encoder is built).
    with pytest.raises(ValueError) as info:
        ViTConfig(embed_dim=16, depth=2, num_heads=2, **overrides)
    assert named in str(info.value)
    assert ViTConfig(window_size=np.int64(14), global_blocks=[np.int64(1)]).window_size == 14


@pytest.mark.parametrize("num_classes", [-1, "10", True, 2.0])
def test_encoder_names_a_wrong_number_of_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):  # torch: "negative dimension -1"
        VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2), num_classes)


def test_mae_names_an_empty_batch_noise_on_another_device_and_a_text_ratio():
    config = model_config("vit_tiny_patch16", img_size=64, pos="abs", **TINY)
    model = MAE(config, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(ValueError, match="MAE needs at least one image"):  # not a NaN loss (0 / 0)
        model(torch.randn(0, 3, 64, 64))
    # the meta device stands in for a GPU here: noise elsewhere gave a NaN loss, on a GPU torch's device error
    with pytest.raises(ValueError, match=r"noise must have shape \(N, L\) = \(2, 16\) on the images' device cpu, "
                                         r"got \(2, 16\) on meta"):
        model(torch.randn(2, 3, 64, 64), noise=torch.rand(2, 16, device="meta"))
    with pytest.raises(ValueError, match="MAE mask_ratio must be a number in \\(0, 1\\), got '0.75'"):
        MAE(config, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mask_ratio="0.75")


def test_mae_names_noise_that_is_no_float_tensor_a_wrong_generator_and_its_decoder_sizes():
    """Bool noise (which would mask the same patches of every image, silently), a list of noise, an int generator
    and a zero-wide decoder are each refused with a message naming the parameter, not an AttributeError or a
    ZeroDivisionError from inside."""
    config = model_config("vit_tiny_patch16", img_size=64, pos="abs", **TINY)
    model = MAE(config, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    images = torch.randn(2, 3, 64, 64)
    for noise, named in ((torch.zeros(2, 16, dtype=torch.bool), "torch.bool"), (torch.randint(9, (2, 16)), "int64"),
                         ([[0.5] * 16] * 2, "list")):
        with pytest.raises(TypeError, match=rf"noise must be a float tensor \(N, L\).*torch.rand\(2, 16\).*{named}"):
            model(images, noise=noise)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        model(images, generator=0)
    with pytest.raises(ValueError, match="MAE decoder_embed_dim must be a positive integer, got 0"):
        MAE(config, decoder_embed_dim=0, decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(ValueError, match="MAE decoder_depth must be a positive integer, got 1.5"):
        MAE(config, decoder_embed_dim=16, decoder_depth=1.5, decoder_num_heads=2)


def test_models_built_from_numpy_numbers_save_checkpoints_and_exports_that_load(tmp_path):
    """numpy's ints and floats pass every size check and are stored as Python numbers: a checkpoint holding numpy
    scalars is refused by the weights-only load ('holds Python objects'), and config.json cannot hold them."""
    import json
    from dataclasses import replace

    from lomar.checkpoints.convert import pretrain_checkpoint
    from lomar.checkpoints.formats import load_model
    from lomar.checkpoints.io import atomic_save
    from lomar.models.beit import BEiTConfig
    from lomar.models.mae_window import MAEWindow

    vit = model_config("vit_tiny_patch16", img_size=np.int64(64), mlp_ratio=np.float32(2.0), drop_path=np.float64(0.1),
                       **TINY)
    json.dumps(vit.to_dict())
    json.dumps(BEiTConfig(img_size=np.int64(32), patch_size=8, embed_dim=16, depth=1, num_heads=2, vocab_size=16,
                          init_values=np.float32(0.1), drop_path_rate=np.float64(0.1)).to_dict())
    abs_vit = replace(vit, pos="abs")
    decoder = dict(decoder_embed_dim=np.int64(16), decoder_depth=np.int64(1), decoder_num_heads=np.int64(2))
    for i, model in enumerate([LoMaR(vit, np.int64(3), np.int64(2), np.float64(0.75)),
                               MAE(abs_vit, mask_ratio=np.float64(0.75), **decoder),
                               MAEWindow(abs_vit, np.int64(3), np.int64(2), np.float64(0.75), **decoder)]):
        atomic_save(pretrain_checkpoint(model), tmp_path / f"{i}.pt")
        assert type(load_model(tmp_path / f"{i}.pt")) is type(model)


@pytest.mark.parametrize("model", [VisionTransformer, LoMaR, MAE])
def test_a_model_name_or_a_dict_given_as_the_config_is_named(model):
    """LoMaR("vit_base_patch16") is a TypeError naming the ViTConfig to build, not an AttributeError about 'pos'."""
    with pytest.raises(TypeError, match=r"config must be a lomar.ViTConfig, got str; build one with "
                                        r"lomar.model_config\('vit_base_patch16'\)"):
        model("vit_base_patch16")
    with pytest.raises(TypeError, match=r"config must be a lomar.ViTConfig, got dict; build one with "
                                        r"lomar.ViTConfig.from_dict\(config\)"):
        model({"img_size": 64})


def test_norm_pix_loss_must_be_a_bool():
    # "no" (or "False" from a hand-written config) is truthy: it would silently mean normalised targets
    config = ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(TypeError, match="norm_pix_loss must be True or False, got 'no'"):
        LoMaR(config, window_size=2, num_windows=2, norm_pix_loss="no")
    with pytest.raises(TypeError, match="norm_pix_loss must be True or False, got 'False'"):
        MAE(ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, pos="abs"),
            decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2, norm_pix_loss="False")


def test_configs_hash_as_they_compare():
    a, b = model_config("vit_tiny_patch16"), model_config("vit_tiny_patch16")
    assert hash(a) == hash(b) and len({a, b, model_config("vit_tiny_patch16", img_size=448)}) == 2
    assert {a: "cached"}[b] == "cached"
    assert ViTConfig(extra={"note": 1}) != ViTConfig()  # extra is left out of the hash, not out of equality


def test_mae_names_images_of_another_size_and_the_img_size_that_takes_them():
    # a non-square batch is told the pair to build with, not 'that img_size' of a square '64px'
    config = model_config("vit_tiny_patch16", img_size=64, pos="abs", **TINY)
    model = MAE(config, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(ValueError, match=r"MAE was built for 64x64 images, got 64x96; resize them, or build it with "
                                         r"img_size=\(64, 96\)$"):
        model(torch.randn(1, 3, 64, 96))
    with pytest.raises(ValueError, match=r"got 32x32; resize them, or build it with img_size=32$"):
        model(torch.randn(1, 3, 32, 32))


def test_a_uint8_batch_is_told_the_call_that_makes_it_one_the_model_takes():
    import torchvision.transforms.v2.functional as F

    from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize

    model = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2))
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError) as info:
        model(pixels)
    fix = "torchvision.transforms.v2.functional.normalize(images / 255, IMAGENET_MEAN, IMAGENET_STD)"
    assert fix in str(info.value) and "lomar.data.transforms" in str(info.value)
    images = F.normalize(pixels / 255, IMAGENET_MEAN, IMAGENET_STD)  # the fix as the message words it
    assert model(images).shape == (2, 16)
    assert torch.allclose(denormalize(images) * 255, pixels.float(), atol=1e-3)


def test_a_plan_drawn_on_the_pixel_size_is_told_that_a_plan_counts_patches():
    model = LoMaR(model_config("vit_mini_patch8", img_size=64, depth=1), window_size=5, num_windows=3)
    plan = lomar.sample_plan(2, (64, 64), 5, 3, 0.8, torch.Generator().manual_seed(0))  # the images' pixels
    with pytest.raises(ValueError) as info:
        model(torch.randn(2, 3, 64, 64), plan=plan)
    assert "outside the 8x8 grid" in str(info.value)
    assert str(info.value).endswith("(a plan counts patches, not pixels: sample_plan's grid is the images' size over "
                                    "the patch size, here (8, 8))")
