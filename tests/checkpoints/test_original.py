"""The settings :func:`lomar.checkpoints.original.infer_original_config` gives an original LoMaR / MAE checkpoint that
saved no args: the original code's defaults, and what the shapes say; an original finetuned classifier, pooled as its
weights say; and the encoder an export, ``encoder_weights`` or ``load_pretrained_encoder`` takes of an original file."""

import argparse
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lomar import MAE, LoMaR, export_encoder, lomar_to_original, model_config
from lomar.checkpoints.convert import export_model
from lomar.checkpoints.formats import encoder_weights, load_model
from lomar.checkpoints.kinds import PRETRAIN_FORMAT, SEGMENT_TASK
from lomar.checkpoints.original import infer_original_config, load_original
from lomar.eval.features import load_pretrained_encoder
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


@pytest.mark.parametrize("marks", [{"format": PRETRAIN_FORMAT}, {"model_spec": {}, "task": SEGMENT_TASK}])
def test_one_of_lomars_own_checkpoints_is_named_so_not_read_as_an_original(marks):
    """A training run's checkpoint (a segmenter's saves its model spec and no format) holds ``encoder.*`` keys."""
    data = {"model": {"encoder.patch_embed.proj.weight": torch.zeros(48, 3, 16, 16)}, **marks}
    with pytest.raises(ValueError, match="not an original LoMaR/MAE checkpoint: .*; it is one of lomar's own: "):
        infer_original_config(data)


def _cls_token_classifier(tmp_path) -> tuple[Path, dict]:
    """The file the original finetune writes with --cls_token (args.global_pool False): the encoder's final norm
    feeds the head, no fc_norm; RPE tables under their original names. Norm and head random: dropping either shows."""
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


def test_a_class_count_the_original_classifiers_head_does_not_have_is_refused_naming_its_rows(tmp_path):
    path, _ = _cls_token_classifier(tmp_path)
    for load in (load_original, export_model):
        with pytest.raises(ValueError, match=r"^num_classes=4 does not fit .*: its head has 5 rows; leave num_classes "
                                             r"out$"):
            load(path, num_heads=4, num_classes=4)


def test_an_original_lomars_encoder_weights_leave_out_the_position_table_its_rpe_encoder_never_reads(tmp_path):
    state = lomar_to_original(LoMaR(model_config("vit_tiny_patch16", img_size=64, **TINY), window_size=2,
                                    num_windows=2).state_dict())
    state["pos_embed"] = torch.zeros(1, 17, 48)  # the original code's sin-cos table, kept but unused (SPEC §6.3)
    torch.save({"model": state, "args": argparse.Namespace(input_size=64)}, tmp_path / "lomar.pth")
    weights = encoder_weights(tmp_path / "lomar.pth", num_heads=4)
    assert weights.config.pos == "rpe" and "pos_embed" in weights.dropped and "pos_embed" not in weights.state
    VisionTransformer(weights.config).load_state_dict(weights.state, strict=True)


def test_an_original_mae_without_its_position_table_is_refused_naming_it_not_read_without_positions(tmp_path):
    state = _mae_state()
    del state["pos_embed"]
    torch.save({"model": state, "args": argparse.Namespace(input_size=64)}, tmp_path / "mae.pth")
    with pytest.raises(ValueError, match=r"does not hold a complete encoder .*: missing \['pos_embed'\]"):
        load_pretrained_encoder(tmp_path / "mae.pth", num_heads=4)


def test_an_original_mae_exports_its_encoder_as_mae_builds_it_with_the_sin_cos_table_fixed(tmp_path):
    torch.save({"model": _mae_state(), "args": argparse.Namespace(input_size=64)}, tmp_path / "mae.pth")
    exported, method = export_model(tmp_path / "mae.pth", num_heads=4)
    built = MAE(model_config("vit_tiny_patch16", img_size=64, pos="abs", **TINY), decoder_embed_dim=32,
                decoder_depth=3, decoder_num_heads=4).encoder
    assert method == "mae" and not exported.pos_embed.requires_grad
    assert {n: p.requires_grad for n, p in exported.named_parameters()} == {
        n: p.requires_grad for n, p in built.named_parameters()}


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_an_encoder_started_from_an_original_classifier_keeps_its_head(tmp_path, pool):
    """``finetune --pretrained`` of an original finetuned classifier with as many classes: its head and its pooling's
    norm are loaded, not initialised afresh."""
    source = VisionTransformer(model_config("vit_tiny_patch16", img_size=64, **TINY), num_classes=3,
                               global_pool=pool).eval()
    with torch.no_grad():
        source.head.bias.normal_()
    state = {k.replace("attn.rpe.table", "attn.rpe_k.lookup_table_weight"): v for k, v in source.state_dict().items()}
    torch.save({"model": state, "args": argparse.Namespace(input_size=64)}, tmp_path / "finetuned.pth")
    model = load_pretrained_encoder(tmp_path / "finetuned.pth", num_classes=3, global_pool=pool, num_heads=4).eval()
    assert model.load_report.fresh == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


def test_an_original_lomar_trained_with_absolute_positions_keeps_its_table(tmp_path):
    """Without iRPE tables (the original's absolute-position ablation) the stored table is the one its encoder reads."""
    source = LoMaR(model_config("vit_tiny_patch16", img_size=64, pos="abs", **TINY), window_size=2, num_windows=2)
    with torch.no_grad():
        source.encoder.pos_embed.normal_()
    torch.save({"model": lomar_to_original(source.state_dict()), "args": argparse.Namespace(input_size=64)},
               tmp_path / "lomar_abs.pth")
    loaded = load_original(tmp_path / "lomar_abs.pth", num_heads=4, window_size=2, num_windows=2)
    assert loaded.encoder.config.pos == "abs" and torch.equal(loaded.encoder.pos_embed, source.encoder.pos_embed)


def test_an_original_of_heads_its_shapes_do_not_tell_names_its_file_in_the_conversion_command(tmp_path):
    """load_original's refusal names the file to convert, as every other reader of it does (formats' encoder read)."""
    path = tmp_path / "odd.pth"  # 40 wide: no standard size, no RPE table, no saved args
    torch.save({"model": VisionTransformer(model_config("vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=40,
                                                        depth=2, num_heads=2, pos="abs")).state_dict()}, path)
    with pytest.raises(ValueError, match=f"convert it first: lomar load-original {path} --num-heads N --to FILE$"):
        load_original(path)


def test_a_vit_without_a_head_pooled_into_fc_norm_loads_as_an_encoder_whose_final_norm_starts_as_identity(
        tmp_path, caplog):
    """timm's num_classes=0 under global_pool='avg' keeps fc_norm and no final norm: the encoder load_original gives
    has every other weight, fc_norm left out (no head follows it) and a final norm that changes nothing, said."""
    config = model_config("vit_tiny_patch16", img_size=32, pos="abs", embed_dim=24, depth=1, num_heads=3)
    state = {k: v for k, v in VisionTransformer(config, num_classes=2).state_dict().items()
             if not k.startswith("head.")}
    assert "fc_norm.weight" in state and "norm.weight" not in state
    torch.save(state, tmp_path / "avg.pth")
    with caplog.at_level(logging.WARNING, logger="lomar.checkpoints"):
        model = load_original(tmp_path / "avg.pth", num_heads=3)
    assert isinstance(model, VisionTransformer) and model.num_classes == 0
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc_norm."))
    assert torch.equal(own["norm.weight"], torch.ones(24)) and torch.equal(own["norm.bias"], torch.zeros(24))
    assert "its fc_norm (timm's global_pool='avg' norm after pooling, which no head follows) is left out" in caplog.text


def test_load_original_refuses_an_exports_weights_file_beside_its_config_naming_the_folder(tmp_path):
    """An export's weights have the keys of a ViT's without a head, which load_original reads as an encoder: beside its
    config.json (which says what the weights cannot) the file is lomar's own, and the folder is named."""
    export_encoder(VisionTransformer(model_config("vit_tiny_patch16", img_size=32, embed_dim=24, depth=1,
                                                  num_heads=3)), tmp_path / "ex")
    with pytest.raises(ValueError, match=r"model\.safetensors is the weights file of the `lomar export` folder .*ex, "
                                         r"lomar's own: it needs no conversion; lomar\.create_encoder\("):
        load_original(tmp_path / "ex" / "model.safetensors", num_heads=3)


def test_an_original_rpe_encoder_without_its_pretraining_parts_is_read_as_the_encoder(tmp_path):
    """An original LoMaR encoder's weights (its iRPE tables under the original's names) without the mask token and
    pixel head: no pretraining model holds them, so load_model gives the encoder, its weights those given."""
    state = {k: v for k, v in lomar_to_original(LoMaR(model_config("vit_tiny_patch16", **TINY)).state_dict()).items()
             if not k.startswith(("mask_token", "encoder_pred."))}
    torch.save({"model": state}, tmp_path / "enc.pth")
    model = load_model(tmp_path / "enc.pth")
    assert type(model) is VisionTransformer and model.num_classes == 0 and model.config.pos == "rpe"
    own = model.state_dict()
    assert torch.equal(own["blocks.1.attn.rpe.table"], state["blocks.1.attn.rpe_k.lookup_table_weight"])
    assert torch.equal(own["norm.weight"], state["norm.weight"])
