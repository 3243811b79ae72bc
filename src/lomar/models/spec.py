"""A model spec: what a checkpoint stores so that the model is rebuilt without training code.

``{"arch": name, "config": the architecture config as a dict, "args": the other constructor
arguments, "prefix": where its keys start in the saved state dict}``. BEiT's pretraining model
holds a tokenizer that is not part of its state, so its spec describes the :class:`BEiT` inside
it (``prefix "beit."``): encoder, mask token and ``lm_head``, which is all a checkpoint keeps.
"""

from __future__ import annotations

from torch import nn

from lomar.models.beit import BEiT, BEiTConfig
from lomar.models.beit_pretrain import BEiTPretrain
from lomar.models.lomar import LoMaR
from lomar.models.mae import MAE
from lomar.models.mae_window import MAEWindow
from lomar.models.vit import ViTConfig

__all__ = ["model_spec", "build_from_spec", "ARCHS"]

# arch name -> (class, its config class)
ARCHS: dict[str, tuple[type[nn.Module], type]] = {
    "lomar": (LoMaR, ViTConfig), "mae": (MAE, ViTConfig), "mae_window": (MAEWindow, ViTConfig),
    "beit": (BEiT, BEiTConfig),
}


def model_spec(model: nn.Module) -> dict:
    """The spec of a LoMaR, MAE, windowed MAE, BEiT or BEiT pretraining model."""
    if isinstance(model, BEiTPretrain):
        return {**model_spec(model.beit), "prefix": "beit."}
    if isinstance(model, BEiT):
        return {"arch": "beit", "config": model.config.to_dict(), "args": {}, "prefix": ""}
    common = dict(mask_ratio=model.mask_ratio, norm_pix_loss=model.norm_pix_loss)
    if isinstance(model, LoMaR):
        arch, args = "lomar", dict(window_size=model.window_size, num_windows=model.num_windows, **common)
    elif isinstance(model, MAEWindow):  # before MAE: it is one
        arch = "mae_window"
        args = dict(window_size=model.window_size, num_windows=model.num_windows, **model.decoder_settings, **common)
    elif isinstance(model, MAE):
        arch, args = "mae", dict(**model.decoder_settings, **common)
    else:
        raise TypeError(f"{type(model).__name__} has no model spec; expected LoMaR, MAE, MAEWindow or BEiT")
    return {"arch": arch, "config": model.config.to_dict(), "args": args, "prefix": ""}


def build_from_spec(spec: dict) -> nn.Module:
    """The (untrained) model a spec describes. ValueError naming what is wrong with the spec."""
    if not isinstance(spec, dict) or spec.get("arch") not in ARCHS:
        arch = spec.get("arch") if isinstance(spec, dict) else spec
        raise ValueError(f"model spec names an unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    cls, config_cls = ARCHS[spec["arch"]]
    config, args = spec.get("config"), spec.get("args", {})
    if not isinstance(config, dict) or not isinstance(args, dict):
        raise ValueError(f"model spec of {spec['arch']} needs 'config' and 'args' mappings")
    try:
        return cls(config_cls.from_dict(config), **args)
    except TypeError as exc:
        raise ValueError(f"model spec of {spec['arch']} does not fit {cls.__name__}: {exc}") from None
