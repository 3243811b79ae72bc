"""The settings :func:`lomar.checkpoints.original.infer_original_config` gives an original LoMaR / MAE checkpoint that
saved no args: the original code's defaults, and what the shapes say; and an original finetuned classifier, pooled as
its weights say."""

import argparse
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lomar import MAE, LoMaR, lomar_to_original, model_config
from lomar.checkpoints.convert import export_model
from lomar.checkpoints.original import infer_original_config, load_original
from lomar.models.vit import VisionTransformer

TINY = dict(embed_dim=48, depth=2, num_heads=4)


def _mae_state(decoder_embed_dim: int = 32, decoder_depth: int = 3) -> dict[str, torch.Tensor]:
    model = MAE(model_config("vit_tiny_patch16", img_size=64, pos="abs", **TINY),
                decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth, decoder_num_heads=4)
    return {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}


def test_an_original_lomar_without_args_takes_the_original_codes_defaults():
    state = lomar_to_original(LoMaR(model_config("vit_tiny_patch16", **TINY)).state_dict())
    method, settings = infer_original_config({"model": state})
    assert method == "lomar"
    assert {k: v for k, v in settings.items() if k != "config"} == dict(
        window_size=7, num_windows=4, mask_ratio=0.8, norm_pix_loss=True)
    assert (settings["config"].img_size, settings["config"].num_heads, settings["config"].pos) == (224, 4, "rpe")
    assert infer_original_config({"model": state}, window_size=5)[1]["window_size"] == 5


def test_the_original_codes_window_count_is_no_cap_to_report_where_the_grid_holds_exactly_that_many(caplog):
    """A 160 px image is a 10x10 grid: 4 positions a side for a 7x7 window, the original's default count."""
    state = lomar_to_original(LoMaR(model_config("vit_tiny_patch16", **TINY)).state_dict())
    with caplog.at_level(logging.WARNING, logger="lomar.checkpoints"):
        assert infer_original_config({"model": state}, img_size=160)[1]["num_windows"] == 4
        assert not caplog.records
        assert infer_original_config({"model": state}, img_size=144)[1]["num_windows"] == 3
    assert "the original's default of 4 7x7 windows is capped at 3 on a 144 px image" in caplog.text


def test_an_original_mae_without_args_takes_the_original_codes_defaults_and_its_decoders_shapes():
    method, settings = infer_original_config({"model": _mae_state()}, num_heads=4, decoder_num_heads=4)
    assert method == "mae"
    assert {k: v for k, v in settings.items() if k != "config"} == dict(
        decoder_embed_dim=32, decoder_depth=3, decoder_num_heads=4, mask_ratio=0.75, norm_pix_loss=True)
    assert settings["config"].pos == "abs"


def test_a_512_wide_mae_decoder_has_16_heads_as_every_published_one():
    settings = infer_original_config({"model": _mae_state(decoder_embed_dim=512, decoder_depth=1)}, num_heads=4)[1]
    assert (settings["decoder_embed_dim"], settings["decoder_depth"], settings["decoder_num_heads"]) == (512, 1, 16)


def _cls_token_classifier(tmp_path) -> tuple[Path, dict]:
    """The file the original finetune writes with --cls_token (args.global_pool False): the encoder's final norm
    feeds the head, no fc_norm; RPE tables under their original names. Norm and head random, so dropping either shows."""
    source = VisionTransformer(model_config("vit_tiny_patch16", img_size=64, **TINY), num_classes=5, global_pool="cls")
    with torch.no_grad():
        for name in ("norm.weight", "norm.bias", "head.bias"):
            source.get_parameter(name).normal_()
    state = {k.replace("attn.rpe.table", "attn.rpe_k.lookup_table_weight"): v for k, v in source.state_dict().items()}
    assert "norm.weight" in state and not any(k.startswith("fc_norm.") for k in state)
    path = tmp_path / "finetuned_cls.pth"
    torch.save({"model": state, "args": argparse.Namespace(model="vit_base_patch16", input_size=64, global_pool=False)},
               path)
    return path, state


def test_an_original_cls_token_classifier_loads_with_its_final_norm_feeding_the_head(tmp_path):
    path, state = _cls_token_classifier(tmp_path)
    loaded = load_original(path, num_heads=4).eval()
    assert (loaded.global_pool, loaded.num_classes) == ("cls", 5) and not hasattr(loaded, "fc_norm")
    encoder = VisionTransformer(model_config("vit_tiny_patch16", img_size=64, **TINY)).eval()
    encoder.load_state_dict({k.replace("attn.rpe_k.lookup_table_weight", "attn.rpe.table"): v
                             for k, v in state.items() if not k.startswith("head.")})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        direct = F.linear(encoder.forward_features(x)[:, 0], state["head.weight"], state["head.bias"])
        torch.testing.assert_close(loaded(x), direct)
        exported, method = export_model(path, num_heads=4)
        assert method is None and exported.global_pool == "cls"
        torch.testing.assert_close(exported.eval()(x), direct)


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_a_pooling_the_original_classifiers_weights_do_not_hold_is_refused_naming_the_one_they_do(tmp_path, pool):
    path, state = _cls_token_classifier(tmp_path)
    if pool == "avg":  # the original's default finetune: fc_norm, the final norm deleted
        state = {("fc_norm." + k.removeprefix("norm.") if k.startswith("norm.") else k): v for k, v in state.items()}
        torch.save({"model": state}, path)
    other = {"avg": "cls", "cls": "avg"}[pool]
    with pytest.raises(ValueError, match=f"global_pool='{other}' does not fit .*pools by '{pool}'; leave global_pool"):
        load_original(path, num_heads=4, global_pool=other)
    assert load_original(path, num_heads=4, global_pool=pool).global_pool == pool
