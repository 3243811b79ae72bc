"""The settings :func:`lomar.checkpoints.original.infer_original_config` gives an original LoMaR / MAE checkpoint that
saved no args: the original code's defaults, and what the shapes say."""

import logging

import torch

from lomar import MAE, LoMaR, lomar_to_original, model_config
from lomar.checkpoints.original import infer_original_config

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
