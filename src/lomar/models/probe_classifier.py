"""A linear probe on its frozen encoder, whole: what ``lomar linprobe --save`` writes and ``lomar.load_model`` rebuilds.

:class:`LinearProbe` is MAE's probe (BatchNorm without affine parameters + a linear layer) on pooled features;
:class:`ProbeClassifier` puts it on the encoder it probed, pooled as it was probed (``mean``: the mean of the normed
patch tokens, ``cls``: the normed cls token), so that images give logits. Its spec's config (:class:`ProbeConfig`) is
the encoder's own model spec (a :class:`~lomar.models.vit.VisionTransformer` or a BEiT's
:class:`~lomar.models.beit_classifier.BEiTClassifier`, without a head), built by
:func:`~lomar.models.spec.build_from_spec`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lomar.models.spec import build_from_spec, model_spec

__all__ = ["LinearProbe", "ProbeConfig", "ProbeClassifier", "POOLS", "pooled_features"]

POOLS = ("mean", "cls")
# The encoders a probe is trained on (load_pretrained_encoder gives one or the other)
_ENCODERS = ("lomar.models.vit:VisionTransformer", "lomar.models.beit_classifier:BEiTClassifier")


def pooled_features(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 1+L, D) normed tokens (cls first) -> (B, D) float32 features: ``mean`` of the patch tokens, or ``cls``;
    contiguous, as the features a probe is trained on are stored (a strided cls column takes BatchNorm's other
    kernel, whose last bits differ)."""
    return (tokens[:, 1:].mean(dim=1) if pool == "mean" else tokens[:, 0]).float().contiguous()


class LinearProbe(nn.Module):
    """BatchNorm without affine parameters + a linear layer on frozen features (as in MAE)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> logits (B, C)."""
        return self.linear(self.norm(features))


@dataclass(frozen=True)
class ProbeConfig:
    """The encoder a probe reads: its model spec (``{"arch", "config", "args"}``, an encoder without a head)."""

    encoder: dict

    def __post_init__(self) -> None:
        spec = self.encoder
        arch = spec.get("arch") if isinstance(spec, dict) else None
        if arch not in _ENCODERS:
            raise ValueError(f"a probe's encoder spec names {arch!r}, not one of {', '.join(_ENCODERS)}")
        config, args = spec.get("config"), spec.get("args")
        if not isinstance(config, dict) or not isinstance(args, dict) or args.get("num_classes") != 0:
            raise ValueError("a probe's encoder spec needs its config and args, with num_classes 0 (no head)")

    @property
    def embed_dim(self) -> int:
        return self.encoder["config"]["embed_dim"]

    @property
    def img_size(self):
        """The size the encoder was probed at (its config's)."""
        return self.encoder["config"]["img_size"]

    def to_dict(self) -> dict:
        return {"encoder": self.encoder}

    @classmethod
    def from_dict(cls, values: dict) -> ProbeConfig:
        if not isinstance(values, dict) or set(values) != {"encoder"}:
            raise ValueError(f"a probe's config holds its encoder's spec alone ({{'encoder': ...}}), got {values!r}")
        return cls(**values)


class ProbeClassifier(nn.Module):
    """A fresh probe (``num_classes`` rows) on the pooled features of ``encoder`` (frozen, without a head): (B, C, H, W)
    images, ImageNet-normalised at ``config.img_size`` -> (B, num_classes) float32 logits, computed as ``lomar
    linprobe`` computes its features (the encoder's normed tokens pooled, in float32) and scores them. Its spec's
    config is the encoder's own spec (:class:`ProbeConfig`), which :meth:`from_config` builds it on."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "mean"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: a probe reads the {' or '.join(POOLS)} features")
        self.encoder, self.pool = encoder, pool
        self.probe = LinearProbe(self.config.embed_dim, num_classes)

    @classmethod
    def from_config(cls, config: ProbeConfig, **args) -> ProbeClassifier:
        """The probe on a new (untrained) encoder of ``config.encoder``; ``args``: the constructor's others."""
        return cls(build_from_spec(config.encoder), **args)

    @property
    def config(self) -> ProbeConfig:
        return ProbeConfig(model_spec(self.encoder))

    @property
    def num_classes(self) -> int:
        return self.probe.linear.out_features

    def spec_args(self) -> dict:
        return {"num_classes": self.num_classes, "pool": self.pool}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) float32: the pooled features the probe was trained on."""
        return pooled_features(self.encoder.forward_features(images), self.pool)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.probe(self.features(images))
