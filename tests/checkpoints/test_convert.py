"""The settings :func:`lomar.checkpoints.convert.pretrain_checkpoint` saves beside a pretraining model, as a
``lomar pretrain`` run names them, and the method fields of its export."""

import argparse

import pytest
import torch

from lomar import MAE, LoMaR, lomar_to_original, model_config
from lomar.checkpoints.convert import encoder_of, export_model, method_metadata, pretrain_checkpoint, pretrain_method
from lomar.models.mae_window import MAEWindow
from lomar.models.vit import VisionTransformer


def test_a_lomar_checkpoints_settings_name_its_model_and_windows_as_its_run_does():
    model = LoMaR(model_config("vit_mini_patch8", img_size=32), window_size=2, num_windows=3)
    assert pretrain_checkpoint(model, source="x.pth")["config"] == dict(
        method="lomar", model="vit_mini_patch8", embed_dim=128, depth=4, num_heads=4, patch_size=8, img_size=32,
        pos="rpe", windows=3, window_size=2, mask_ratio=0.8, norm_pix_loss=True)


@pytest.mark.parametrize("shape, name", [(dict(embed_dim=64, patch_size=8), "vit_base_patch8"),
                                         (dict(patch_size=4), "vit_mini_patch16")])
def test_a_shape_or_patch_of_no_named_model_is_named_by_the_default_and_given_in_full(shape, name):
    """A width or patch no model name has is written beside a name of the default (base, patch 16): the fields
    that follow the name give the model."""
    config = model_config("vit_mini_patch8", img_size=32, pos="abs", **shape)
    settings = pretrain_checkpoint(MAE(config, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4))["config"]
    assert settings["model"] == name
    assert (settings["embed_dim"], settings["patch_size"], settings["pos"]) == (config.embed_dim, config.patch_size,
                                                                                "abs")


def test_only_an_mae_with_windows_names_its_windows_among_its_method_fields():
    config = model_config("vit_mini_patch8", img_size=32, pos="abs")
    heads = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    assert method_metadata(MAEWindow(config, window_size=2, num_windows=2, **heads)) == {"method": "mae", "windows": 2}
    assert method_metadata(MAE(config, **heads)) == {"method": "mae"}
    lomar = LoMaR(model_config("vit_mini_patch8", img_size=32), window_size=2, num_windows=3)
    assert method_metadata(lomar) == {"method": "lomar"}


def test_a_model_of_no_lomar_encoder_is_named():
    with pytest.raises(TypeError, match=r"^Linear has no lomar ViT encoder; pass a lomar\.VisionTransformer"):
        encoder_of(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"^cannot write a pretraining checkpoint for Linear$"):
        pretrain_method(torch.nn.Linear(2, 2))


def test_an_original_classifier_exports_whole_under_no_pretraining_method(tmp_path):
    """The original finetuned classifier's keys: RPE tables under their original names, fc_norm + head, no final
    norm."""
    model = VisionTransformer(model_config("vit_tiny_patch16", img_size=64, embed_dim=48, depth=2, num_heads=4),
                              num_classes=7).eval()
    state = {k.replace("attn.rpe.table", "attn.rpe_k.lookup_table_weight"): v
             for k, v in model.state_dict().items() if not k.startswith("norm.")}
    torch.save({"model": state, "args": argparse.Namespace(model="vit_base_patch16", input_size=64)},
               tmp_path / "finetuned.pth")
    exported, method = export_model(tmp_path / "finetuned.pth", num_heads=4)
    assert method is None and isinstance(exported, VisionTransformer) and exported.num_classes == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(x), model(x))


def test_an_override_given_as_none_is_no_override_as_load_model_reads_it(tmp_path):
    """None means not given (the CLI's unset flag): an export of an original LoMaR is not refused a window setting
    it has no use for, nor asked for a decoder's heads."""
    model = LoMaR(model_config("vit_tiny_patch16", img_size=64, embed_dim=48, depth=2, num_heads=4), window_size=2,
                  num_windows=2)
    torch.save({"model": lomar_to_original(model.state_dict()), "args": argparse.Namespace(input_size=64)},
               tmp_path / "lomar.pth")
    exported, method = export_model(tmp_path / "lomar.pth", num_heads=4, window_size=None, num_windows=None,
                                    decoder_num_heads=None, img_size=None)
    assert method == "lomar" and exported.config == model.encoder.config
