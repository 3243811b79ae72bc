"""Any checkpoint -> a model, and ``lomar load-original``: original checkpoint -> ours.

:func:`load_model` (from :mod:`lomar.checkpoints.formats`, which detects and reads every
format) is re-exported here for the commands; this module writes our checkpoints.
"""

from __future__ import annotations

from torch import nn

from lomar.checkpoints.formats import CLASSIFIER_FORMAT, PRETRAIN_FORMAT, load_model, load_original
from lomar.models.vit import MODEL_SIZES, PATCH_SIZES, VisionTransformer

__all__ = ["load_model", "encoder_of", "pretrain_checkpoint",
           "PRETRAIN_FORMAT", "CLASSIFIER_FORMAT", "load_original"]


def encoder_of(model: nn.Module) -> VisionTransformer:
    """The encoder of a LoMaR / MAE model, or the VisionTransformer itself."""
    encoder = getattr(model, "encoder", model)
    if not isinstance(encoder, VisionTransformer):
        raise TypeError(f"{type(model).__name__} has no ViT encoder")
    return encoder


# ---- writing -------------------------------------------------------------------------------
def pretrain_checkpoint(model: nn.Module, source: str | None = None) -> dict:
    """Our checkpoint of a LoMaR / MAE model: ``{"model", "config", "format", "source"}``.

    ``config`` is a full pretraining config (``lomar pretrain`` flags), so the checkpoint is
    readable by ``lomar export``, ``lomar visualize`` and ``--pretrained``. A classifier is
    written as ``{"model", "vit_config", "num_classes", "format": "lomar-classifier-1"}``.
    """
    from lomar.models import MAE, LoMaR
    from lomar.train.config import PretrainConfig, build_model

    vit = encoder_of(model).config
    if isinstance(model, VisionTransformer):
        return {"model": model.state_dict(), "vit_config": vit.to_dict(), "num_classes": model.num_classes,
                "format": CLASSIFIER_FORMAT, "source": source}
    if vit.mlp_ratio != 4.0 or vit.in_chans != 3:
        raise ValueError(f"only MLP ratio 4 and 3 input channels can be described by a pretraining config "
                         f"(got {vit.mlp_ratio}, {vit.in_chans})")
    shape = (vit.embed_dim, vit.depth, vit.num_heads)
    size = next((s for s, v in MODEL_SIZES.items() if v == shape), "base")
    patch = vit.patch_size if vit.patch_size in PATCH_SIZES else 16
    values = dict(model=f"vit_{size}_patch{patch}", embed_dim=vit.embed_dim, depth=vit.depth,
                  num_heads=vit.num_heads, patch_size=vit.patch_size, img_size=vit.img_size, pos=vit.pos,
                  norm_pix_loss=model.norm_pix_loss, mask_ratio=model.mask_ratio)
    if isinstance(model, LoMaR):
        values.update(method="lomar", window_size=model.window_size, windows=model.num_windows)
    elif isinstance(model, MAE):
        settings = model.decoder_settings
        values.update(method="mae", windows=0, decoder_embed_dim=settings["decoder_embed_dim"],
                      decoder_depth=settings["decoder_depth"], decoder_num_heads=settings["decoder_num_heads"])
    else:
        raise TypeError(f"cannot write a pretraining checkpoint for {type(model).__name__}")
    config = PretrainConfig(**values)
    state = model.state_dict()
    build_model(config).load_state_dict(state, strict=True)  # proves the checkpoint rebuilds
    return {"model": state, "config": config.to_dict(), "format": PRETRAIN_FORMAT, "source": source}


# ---- shared CLI flags ------------------------------------------------------------------------
