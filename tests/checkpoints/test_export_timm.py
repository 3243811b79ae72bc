"""An export read by timm (the lomar_vit_* registration): the same features and classifier as lomar's, its
forward_intermediates and features_only, other input channels and sizes, pooling, and the pretrained_cfg it gives
timm's eval transform."""

import json
from dataclasses import replace

import pytest
import torch
from export_models import TINY, X, _perturb

from helpers import reference_dir
from lomar import VisionTransformer, ViTConfig, create_encoder, export_encoder, load_original

timm = pytest.importorskip("timm")
import timm.optim  # noqa: E402,F811  (not imported by `import timm`)

import lomar.integrations.timm  # noqa: E402,F401  (registers lomar_vit_* in timm)


def test_timm_classifier_matches_ours(tmp_path):
    torch.manual_seed(1)
    ours = _perturb(VisionTransformer(TINY, num_classes=5))
    with torch.no_grad():
        ours.head.weight.normal_()
    export_encoder(ours, tmp_path / "cls")
    m = timm.create_model(f"local-dir:{tmp_path / 'cls'}", pretrained=True).eval()
    assert m.num_classes == 5 and isinstance(m.norm, torch.nn.Identity)  # fc_norm after pooling
    assert torch.equal(m(X), ours(X))
    m.reset_classifier(3)
    assert m(X).shape == (2, 3) and m.get_classifier().out_features == 3
    # a pretrained encoder with a new head: the head and fc_norm start fresh
    fresh = timm.create_model(f"local-dir:{tmp_path / 'cls'}", pretrained=True, num_classes=7)
    assert fresh(X).shape == (2, 7)
    groups = timm.optim.create_optimizer_v2(fresh, "adamw", lr=1e-3, layer_decay=0.75)
    assert len(groups.param_groups) > 2


def test_a_classifiers_model_args_name_its_head_as_timms_own_exports_do(tmp_path):
    """timm's save_for_hf writes num_classes into model_args (its reconstruction arguments) too, and so does an
    export: a build from its architecture and model_args alone has the head its weights' head.* fill. An export
    without num_classes there (an older lomar's) still loads."""
    from safetensors.torch import load_file

    torch.manual_seed(1)
    ours = _perturb(VisionTransformer(TINY, num_classes=5, global_pool="cls"))
    export_encoder(ours, tmp_path / "cls")
    config = json.loads((tmp_path / "cls" / "config.json").read_text())
    assert config["model_args"]["num_classes"] == 5 and config["model_args"]["global_pool"] == "token"
    rebuilt = timm.create_model(config["architecture"], **config["model_args"]).eval()
    rebuilt.load_state_dict(load_file(str(tmp_path / "cls" / "model.safetensors")))
    assert torch.equal(rebuilt(X), ours(X))
    del config["model_args"]["num_classes"]
    (tmp_path / "cls" / "config.json").write_text(json.dumps(config))
    local = timm.create_model(f"local-dir:{tmp_path / 'cls'}", pretrained=True)
    for older in (create_encoder(tmp_path / "cls"), local):
        assert older.num_classes == 5 and torch.equal(older.eval()(X), ours(X))


def test_timm_reads_original_checkpoint():
    path = reference_dir() / "lomar_224_4win" / "checkpoint.pth"
    if not path.is_file():
        pytest.skip("reference checkpoint not available")
    encoder = load_original(path, num_heads=4).encoder.eval()
    m = timm.create_model("lomar_vit_tiny_patch16", pretrained=True, embed_dim=48, depth=2, num_heads=4,
                          pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert torch.equal(m.forward_features(X), encoder.forward_features(X))


def test_a_cls_pooling_classifier_round_trips_through_lomar_and_timm(tmp_path):
    torch.manual_seed(3)
    ours = _perturb(VisionTransformer(TINY, num_classes=5, global_pool="cls")).eval()
    export_encoder(ours, tmp_path / "cls")
    assert json.loads((tmp_path / "cls" / "config.json").read_text())["global_pool"] == "cls"
    again = create_encoder(tmp_path / "cls").eval()
    assert again.global_pool == "cls" and torch.equal(again(X), ours(X))
    timm_model = timm.create_model(f"local-dir:{tmp_path / 'cls'}", pretrained=True).eval()
    torch.testing.assert_close(timm_model(X), ours(X))
    plain = create_encoder(tmp_path / "cls", num_classes=0)  # the encoder alone keeps its final norm
    torch.testing.assert_close(plain.forward_features(X), ours.forward_features(X))
    with pytest.raises(ValueError, match="unknown encoder setting.*num_class;"):
        create_encoder(tmp_path / "cls", num_class=3)


def test_timm_weights_of_a_shallower_export_name_what_they_lack(tmp_path):
    export_encoder(VisionTransformer(replace(TINY, depth=1)), tmp_path / "one")
    with pytest.raises(ValueError, match="the weights lack blocks.1.norm1.weight.*see config.json's model_args"):
        timm.create_model("lomar_vit_tiny_patch16", pretrained=True, embed_dim=32, depth=2, num_heads=2, img_size=64,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "one" / "model.safetensors")))


def test_features_only_takes_every_block_of_an_encoder_shallower_than_three():
    model = timm.create_model("lomar_vit_tiny_patch16", features_only=True, depth=2, embed_dim=32, num_heads=2,
                              img_size=64)
    assert [tuple(f.shape) for f in model(torch.randn(1, 3, 64, 64))] == [(1, 32, 4, 4)] * 2


def test_timm_resamples_a_fixed_table_from_the_grid_it_names_and_loads_non_strictly_when_asked(tmp_path):
    wide = VisionTransformer(ViTConfig(img_size=(16, 64), patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                       pos="abs"))
    export_encoder(wide, tmp_path / "wide")  # a 2x8 grid: 16 tokens, which a square reading takes for 4x4
    resized = timm.create_model(f"local-dir:{tmp_path / 'wide'}", pretrained=True, img_size=(32, 128))
    torch.testing.assert_close(resized.pos_embed.detach(), wide.pos_embed_for((4, 16)))
    export_encoder(VisionTransformer(replace(TINY, depth=1)), tmp_path / "one")
    loose = timm.create_model("lomar_vit_tiny_patch16", pretrained=True, embed_dim=32, depth=2, num_heads=2,
                              img_size=64, pretrained_strict=False,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "one" / "model.safetensors")))
    assert len(loose.blocks) == 2


def test_timms_token_pooling_exports_as_cls_and_a_pooling_change_starts_a_fresh_head(tmp_path):
    torch.manual_seed(4)
    token = timm.create_model("lomar_vit_tiny_patch16", embed_dim=32, depth=2, num_heads=2, img_size=64,
                              num_classes=5, global_pool="token").eval()
    export_encoder(token, tmp_path / "token")
    assert json.loads((tmp_path / "token" / "config.json").read_text())["global_pool"] == "cls"
    torch.testing.assert_close(create_encoder(tmp_path / "token").eval()(X), token(X))
    with pytest.raises(ValueError, match="pooling by 'avg' or 'cls'"):
        export_encoder(timm.create_model("lomar_vit_tiny_patch16", embed_dim=32, depth=2, num_heads=2, img_size=64,
                                         num_classes=5, global_pool="max"), tmp_path / "max")
    exported = _exported_head(tmp_path / "token")
    for pool in ("avg", "cls"):
        rebuilt = create_encoder(tmp_path / "token", global_pool=pool)
        assert torch.equal(rebuilt.head.weight.detach(), exported) == (pool == "cls")  # the trained head fits cls only


def _exported_head(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))["head.weight"]


def test_the_pretrained_cfg_gives_timm_the_exported_input_size_and_lomars_eval_crop(tmp_path):
    """A non-square export wrote input_size [3, [64, 96], [64, 96]], on which timm's eval transform failed; a
    classifier above 224 px gave crop_pct 0.875 where `lomar finetune` scored it with the whole image (1.0)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    export_encoder(VisionTransformer(replace(TINY, img_size=(64, 96))), tmp_path / "wide")
    model = timm.create_model(f"local-dir:{tmp_path / 'wide'}", pretrained=True)
    transform = create_transform(**resolve_data_config(model=model))
    assert transform(Image.new("RGB", (150, 100))).shape == (3, 64, 96)
    crops = []
    for side, classes in ((224, 3), (256, 3), (256, 0)):
        folder = tmp_path / f"{side}-{classes}"
        export_encoder(VisionTransformer(replace(TINY, img_size=side), num_classes=classes), folder)
        crops.append(json.loads((folder / "config.json").read_text())["pretrained_cfg"]["crop_pct"])
    assert crops == [0.875, 1.0, 1.0]  # an encoder at 256 px: as knn and linprobe crop, finetune's rule


def test_a_beit_exports_pretrained_cfg_gives_timm_the_crop_lomar_scores_its_encoder_with(tmp_path):
    """A BEiT export said crop_pct 0.9, so timm's eval transform of it cropped otherwise than lomar knn / linprobe,
    which crop every encoder by eval_crop_ratio (1.0 at its 256 px), BEiT's too; it follows the one rule of the ViT
    exports."""
    from timm.data import resolve_data_config

    from lomar.checkpoints.export_beit import export_beit_encoder
    from lomar.models.beit import BEiT, BEiTConfig

    vit = tmp_path / "vit"
    export_encoder(VisionTransformer(replace(TINY, img_size=256)), vit)
    export_beit_encoder(BEiT(BEiTConfig(img_size=256, patch_size=64, embed_dim=32, depth=1, num_heads=2,
                                        vocab_size=16)), tmp_path / "beit")
    crops = [json.loads((folder / "config.json").read_text())["pretrained_cfg"] for folder in (vit, tmp_path / "beit")]
    assert crops[1]["crop_pct"] == crops[0]["crop_pct"] == 1.0  # lomar's eval crop at 256 px, not timm's BEiT 0.9
    model = timm.create_model(f"local-dir:{tmp_path / 'beit'}", pretrained=True)
    assert resolve_data_config(model=model)["crop_pct"] == 1.0


def test_a_one_channel_exports_pretrained_cfg_normalises_a_grey_image_for_timm(tmp_path):
    """An in_chans=1 export gave timm ImageNet's three means and stds, so its eval transform failed on a grey image (a
    broadcast error); one grey channel takes their mean, as timm's stem adaptation sums the RGB weights."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    export_encoder(VisionTransformer(replace(TINY, in_chans=1)), tmp_path / "grey")
    model = timm.create_model(f"local-dir:{tmp_path / 'grey'}", pretrained=True).eval()
    config = resolve_data_config(model=model)
    assert (config["mean"], config["std"]) == ([0.449], [0.226])
    image = create_transform(**config)(Image.new("L", (80, 70), 128))
    assert image.shape == (1, 64, 64) and torch.allclose(image, torch.full_like(image, (128 / 255 - 0.449) / 0.226))
    assert model(image[None]).shape == (1, 32)


def test_timms_dynamic_img_size_is_taken_since_any_size_works():
    torch.manual_seed(0)
    plain = timm.create_model("lomar_vit_tiny_patch16", embed_dim=32, depth=1, num_heads=2, img_size=32, pos="abs")
    dynamic = timm.create_model("lomar_vit_tiny_patch16", embed_dim=32, depth=1, num_heads=2, img_size=32, pos="abs",
                                dynamic_img_size=True)  # TypeError before
    dynamic.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 48, 64)
    torch.testing.assert_close(dynamic.eval()(x), plain.eval()(x))
    assert dynamic.dynamic_img_size
