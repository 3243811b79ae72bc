"""A model spec: what a checkpoint stores so that the model is rebuilt without training code.

``{"arch": "lomar.models.<module>:<Class>", "config": its architecture config as a dict, "args":
the other constructor arguments, "prefix": where its keys start in the saved state dict}``. A
model class takes part by defining ``spec_args()`` (its constructor arguments beyond the config)
and a ``config`` with ``to_dict``/``from_dict``; only classes of :mod:`lomar.models` are ever built.

A :class:`~lomar.models.vit.VisionTransformer`'s args are its head (``num_classes``, ``global_pool``), so that a
classifier's checkpoint rebuilds it too. BEiT's pretraining model holds a tokenizer that is not part of its state,
so its spec describes the :class:`~lomar.models.beit.BEiT` inside it (prefix ``beit.``): encoder, mask token and
``lm_head``, which is all a checkpoint keeps (``spec_target``).

A dense model is built around an encoder it is given (:class:`BuiltOnEncoder`: ``lomar detect``'s
:class:`~lomar.models.mask_rcnn.ViTMaskRCNN`, ``lomar segment``'s :class:`~lomar.models.segmenter.UperNetSegmenter`):
its config is its encoder's ViTConfig, its args its head's settings, and the spec builds it with ``from_config``, on a
new encoder of that config. One format for all: a class, the config its architecture starts from, the rest as args.
"""

from __future__ import annotations

import importlib
import inspect

from torch import nn

from lomar.models.vit import VisionTransformer, ViTConfig

__all__ = ["model_spec", "build_from_spec", "BuiltOnEncoder"]


class BuiltOnEncoder:
    """A model built around the VisionTransformer it is given (``encoder``): its spec's config is that encoder's
    ViTConfig, and :meth:`from_config` builds it on a new encoder of a config. The class defines ``spec_args()``."""

    @property
    def config(self) -> ViTConfig:
        return self.encoder.config

    @classmethod
    def from_config(cls, config: ViTConfig, **args) -> nn.Module:
        """The model on a new (untrained) encoder of ``config``; ``args``: the constructor's others."""
        return cls(VisionTransformer(config), **args)


def model_spec(model: nn.Module) -> dict:
    """The spec of a model whose class defines ``spec_args`` (LoMaR, MAE, MAEWindow, BEiT, BEiTPretrain,
    VisionTransformer: an encoder or classifier)."""
    target, prefix = getattr(model, "spec_target", lambda: (model, ""))()
    # The first lomar class in the MRO: FSDP2 swaps a sharded module's class for a subclass of its own. A lomar
    # subclass from outside lomar.models (timm's LomarVisionTransformer) builds itself otherwise: its parent's spec
    # would describe another model.
    mro = type(target).__mro__
    found = next((i for i, c in enumerate(mro) if c.__module__.startswith("lomar.models.") and "spec_args" in vars(c)),
                 None)
    if found is None or any(c.__module__.startswith("lomar.") for c in mro[:found]):
        raise TypeError(f"{type(model).__name__} has no model spec; a lomar.models class with spec_args() has one")
    cls = mro[found]
    return {"arch": f"{cls.__module__}:{cls.__qualname__}", "config": target.config.to_dict(),
            "args": target.spec_args(), "prefix": prefix}


def build_from_spec(spec: dict) -> nn.Module:
    """The (untrained) model a spec describes. ValueError naming what is wrong with the spec."""
    arch = spec.get("arch") if isinstance(spec, dict) else None
    module, _, name = str(arch).partition(":")
    if not module.startswith("lomar.models.") or not name.isidentifier():
        raise ValueError(f"model spec names {arch!r}, not a lomar.models class ('lomar.models.MODULE:CLASS')")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ValueError(f"model spec names {arch!r}, which this version of lomar does not have") from None
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module) and hasattr(cls, "spec_args")):
        raise ValueError(f"model spec names {arch!r}, which is not a model with a spec")
    config, args = spec.get("config"), spec.get("args", {})
    if not isinstance(config, dict) or not isinstance(args, dict):
        raise ValueError(f"model spec of {arch} needs 'config' and 'args' mappings")
    build = getattr(cls, "from_config", cls)  # a model built on an encoder (BuiltOnEncoder) takes its config there
    config_cls = inspect.signature(build).parameters["config"].annotation
    if isinstance(config_cls, str):  # postponed annotations: "ViTConfig", "BEiTConfig | None", in build's module
        config_cls = getattr(importlib.import_module(build.__module__), config_cls.split("|")[0].strip())
    try:
        return build(config_cls.from_dict(config), **args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model spec of {arch} does not fit {name}: {exc}") from None
