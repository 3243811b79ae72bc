"""A ViT's architecture as data: :class:`ViTConfig` (every setting that rebuilds an encoder), the named
sizes and :func:`model_config`. Checked on construction; imports no torch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from difflib import get_close_matches
from typing import Literal

from lomar.limits import MAX_IMG_SIZE
from lomar.values import as_sides, is_integer, is_real, is_size

__all__ = ["ViTConfig", "EncoderShape", "MODEL_SIZES", "PATCH_SIZES", "model_config", "list_models", "mlp_ratio_of"]

PosMode = Literal["rpe", "abs", "none"]
REL_POS_MODES = ("none", "decomposed", "bias")  # lomar.models.relpos's terms

# name -> (embed_dim, depth, num_heads)
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "mini": (128, 4, 4),  # the demo's (lomar pretrain without --data)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
PATCH_SIZES = (8, 14, 16)


@dataclass(frozen=True)
class EncoderShape:
    """The sizes of a ViT and of BEiT, and the dict a model spec stores (:mod:`lomar.models.spec`).

    ``from_dict`` takes the known fields only, so a richer dict (a golden case's meta, a config saved
    by another version) can be passed whole.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        """The config of ``data``'s fields, others left out (a ``config.json`` also names its architecture)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ViTConfig(EncoderShape):
    """Architecture of an encoder; everything needed to rebuild it.

    ``attention``: how the iRPE bias is computed (``auto``, ``dense``, ``chunked``, ``flex``; same
    result, see :mod:`lomar.models.attention`). ``window_size`` > 0: ViTDet-style blocks that
    attend inside ``window_size``² windows of the patch grid, except the blocks listed in
    ``global_blocks`` (e.g. 14 and (2, 5, 8, 11) for ViT-B); see :meth:`Block.forward`.
    """

    pos: PosMode = "rpe"
    drop_path: float = 0.0
    attention: str = "auto"
    window_size: int = 0
    global_blocks: tuple[int, ...] = ()
    rel_pos: str = "none"
    extra: dict = field(default_factory=dict, hash=False)  # a dict cannot be hashed; equality still compares it

    @staticmethod
    def require(config) -> None:
        """TypeError unless ``config`` is a ViTConfig: a model's name or a dict would otherwise fail further in, as
        an AttributeError."""
        if not isinstance(config, ViTConfig):
            make = (f"lomar.model_config({config!r})" if isinstance(config, str) else
                    "lomar.ViTConfig.from_dict(config) (an export's config.json reads so too)"
                    if isinstance(config, dict) else "lomar.model_config(NAME, ...)")
            raise TypeError(f"config must be a lomar.ViTConfig, got {type(config).__name__}; build one with {make} "
                            f"or lomar.ViTConfig(...)")

    def __post_init__(self) -> None:
        blocks = self.global_blocks
        if isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__") or not all(
                is_integer(i) for i in blocks):  # a str would be read digit by digit
            raise ValueError(f"ViTConfig.global_blocks must be a sequence of block indices (integers), got {blocks!r}")
        object.__setattr__(self, "global_blocks", tuple(int(i) for i in blocks))
        if not is_integer(self.window_size) or self.window_size < 0:
            raise ValueError(f"ViTConfig.window_size must be an integer >= 0 (0: global attention), got "
                             f"{self.window_size!r}")
        object.__setattr__(self, "window_size", int(self.window_size))
        # numpy's integers are sizes too; a bool is not. A square size stays the int (config.json, a checkpoint)
        if not is_size(self.img_size) or min(as_sides(self.img_size)) <= 0:
            raise ValueError(f"ViTConfig.img_size must be a positive integer (or a (height, width) pair), got "
                             f"{self.img_size!r}")
        sides = as_sides(self.img_size)
        object.__setattr__(self, "img_size", sides[0] if is_integer(self.img_size) else sides)
        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if not (is_integer(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
            object.__setattr__(self, name, int(getattr(self, name)))
        if max(sides) > MAX_IMG_SIZE:  # timm builds an export from its config.json's model_args alone
            raise ValueError(f"ViTConfig.img_size must be at most {MAX_IMG_SIZE} (lomar.limits.MAX_IMG_SIZE), got "
                             f"{self.img_size!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTConfig.embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; "
                             f"pick a divisor of {self.embed_dim}")
        if self.rel_pos not in REL_POS_MODES:
            raise ValueError(f"ViTConfig.rel_pos must be one of {', '.join(REL_POS_MODES)}, got {self.rel_pos!r}")
        if self.rel_pos != "none" and self.pos == "rpe":
            raise ValueError(f"ViTConfig.rel_pos={self.rel_pos!r} is for encoders without iRPE (pos 'abs' or 'none'); "
                             f"a LoMaR encoder has its own relative position")
        if not (is_real(self.mlp_ratio) and self.mlp_ratio > 0) or not (
                is_real(self.drop_path) and 0 <= self.drop_path < 1):
            raise ValueError(f"ViTConfig needs mlp_ratio > 0 and drop_path in [0, 1), got {self.mlp_ratio!r} and "
                             f"{self.drop_path!r}")
        for name in ("mlp_ratio", "drop_path"):  # numpy's floats would not go into config.json or a checkpoint
            object.__setattr__(self, name, float(getattr(self, name)))


def list_models() -> list[str]:
    """Every name :func:`model_config` takes: ``vit_{size}_patch{p}`` for each of :data:`MODEL_SIZES` and
    :data:`PATCH_SIZES`."""
    return [f"vit_{s}_patch{p}" for s in MODEL_SIZES for p in PATCH_SIZES]


def model_config(name: str, **overrides) -> ViTConfig:
    """Config for a named model such as ``vit_base_patch16``; keyword arguments override (ViTConfig's fields; another
    keyword is a TypeError naming the field it resembles, such as timm's ``image_size`` for ``img_size``)."""
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    fields = list(ViTConfig.__dataclass_fields__)
    for key in overrides:
        if key not in fields:  # dataclasses' own TypeError names neither the fields nor the likely one
            like = get_close_matches(key, fields, n=1)
            hint = (f"; the head is the model's: lomar.VisionTransformer(config, {key}=...)"
                    if key in ("num_classes", "global_pool") else f"; did you mean {like[0]}=?" if like else "")
            raise TypeError(f"model_config got {key}={overrides[key]!r}, which is no ViTConfig field (fields: "
                            f"{', '.join(fields)}){hint}")
    _, size, patch = name.split("_")
    dim, depth, heads = MODEL_SIZES[size]
    base = ViTConfig(patch_size=int(patch.removeprefix("patch")), embed_dim=dim, depth=depth, num_heads=heads)
    return replace(base, **overrides)


def mlp_ratio_of(embed_dim: int, hidden: int) -> float:
    """The ``mlp_ratio`` that builds a ``hidden``-wide MLP on ``embed_dim`` (a block takes ``int(embed_dim * ratio)``,
    and ``hidden / embed_dim`` can build one too few in floats: 352 * (960 / 352) is 959.99...)."""
    ratio = hidden / embed_dim
    return ratio if int(embed_dim * ratio) == hidden else math.nextafter(ratio, math.inf)
