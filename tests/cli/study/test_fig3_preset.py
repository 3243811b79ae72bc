"""fig3 at small scale times MAE with a decoder scaled to the small encoder, as MAE-base's is to ViT-B."""

from pathlib import Path

from lomar.cli.study.presets import build_preset
from lomar.cli.study.runner import cell_config


def _mae(name: str, scale: str = "small"):
    spec = build_preset(name, budget="60s", scale=scale)
    return [cell_config(spec, c, Path("/nonexistent-study"), check=True) for c in spec.cells()
            if c.settings["method"] == "mae"]


def test_fig3_mae_decoder_is_narrower_than_its_encoder_at_both_scales():
    """MAE-base's 512-wide, 8-block decoder on fig3's 128-wide small encoder made each MAE step 30-40x a step with
    enc-dec's small decoder: the time axis of the paper's Fig. 3 compared the decoder's cost, not the methods."""
    (small,) = _mae("fig3")
    assert small.decoder_embed_dim < small.embed_dim  # as 512 < 768 in the paper's MAE-base
    assert (small.decoder_embed_dim, small.decoder_depth) == \
        {(c.decoder_embed_dim, c.decoder_depth) for c in _mae("enc-dec")}.pop()  # one small MAE in every preset
    (paper,) = _mae("fig3", scale="paper")
    assert (paper.model, paper.decoder_embed_dim, paper.decoder_depth) == ("vit_base_patch16", 512, 8)  # MAE-base
