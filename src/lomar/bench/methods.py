"""Bench models beyond plain LoMaR / MAE: BEiT (global), BEiT + windows, MAE + windows.

BEiT steps include their tokenizer: a DALL-E dVAE encoder of the original size (n_hid 256, 2 blocks
per group, vocabulary 8192; random weights, which cost the same as trained ones) labelling the
second view at grid × 8 px (112 px at 224) in no_grad, inside the timed and FLOP-counted forward.
"""

from __future__ import annotations

from torch import nn

from lomar.models.beit import BEiTConfig
from lomar.models.beit_pretrain import BEiTPretrain
from lomar.models.mae_window import MAEWindow
from lomar.models.masking import grid_size
from lomar.models.vit import model_config
from lomar.tokenizers import DVAEConfig, DVAEEncoder

__all__ = ["VARIANTS", "build_variant_model", "beit_comparisons"]

VARIANTS = ("beit", "beit_window", "mae_window")


def build_variant_model(method: str, model_name: str, img_size: int, windows: int | None,
                        tiny: bool = False) -> nn.Module:
    """The training model of a bench variant (windows: per image, 7×7; None for global BEiT)."""
    overrides = dict(embed_dim=32, depth=1, num_heads=2) if tiny else {}
    vit = model_config(model_name, img_size=img_size, pos="abs", **overrides)
    grid = grid_size(img_size, vit.patch_size)
    if method == "mae_window":
        decoder = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2) if tiny else {}
        return MAEWindow(vit, 7, int(windows), 0.75, **decoder)
    if method not in ("beit", "beit_window"):
        raise ValueError(f"unknown bench method {method!r}; choose one of {', '.join(VARIANTS)}")
    dvae = DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=64) if tiny else DVAEConfig()
    tokenizer = DVAEEncoder(DVAEConfig(**{**dvae.__dict__, "input_size": grid[0] * 8}))
    beit = BEiTConfig.from_vit(vit, tokenizer.vocab_size)
    n = int(windows) if method == "beit_window" else 0
    return BEiTPretrain(beit, tokenizer, window_size=7, num_windows=n, mask_ratio=None)


def beit_comparisons(records: list[dict]) -> list[dict]:
    """Per size: BEiT / LoMaR, BEiT / BEiT+windows and BEiT+windows / LoMaR time and FLOP ratios."""
    def at(method: str, size: int) -> dict | None:
        found = [r for r in records if r["method"] == method and r["img_size"] == size]
        paper = [r for r in found if r.get("window_setting") == "paper"]
        return (paper or found or [None])[0]

    out = []
    for size in sorted({r["img_size"] for r in records}):
        beit, window, lomar = at("beit", size), at("beit_window", size), at("lomar", size)
        row: dict = {"img_size": size}
        for name, a, b in (("beit_over_lomar", beit, lomar), ("beit_over_beit_window", beit, window),
                           ("beit_window_over_lomar", window, lomar)):
            if a is not None and b is not None:
                row[f"{name}_time"] = a["step_s"] / b["step_s"]
                row[f"{name}_flops"] = a["flops"] / b["flops"]
        if len(row) > 1:
            out.append(row)
    return out
