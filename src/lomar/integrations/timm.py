"""Our encoders in timm's model registry: ``lomar_vit_{mini,tiny,small,base,large,huge}_patch{8,14,16}``.

Importing this module imports timm (seconds) and registers the models; ``import lomar`` alone
never does. Typical use::

    import lomar.timm_models  # noqa: F401  (registers the models)
    import timm

    # any exported architecture (custom widths, pos, image size included), from the folder's config.json:
    model = timm.create_model("local-dir:export", pretrained=True)
    # or the weights alone, into the name's model: pass what config.json's model_args add (an MAE export's pos="abs");
    # a classifier's weights keep their head unless num_classes is passed
    model = timm.create_model("lomar_vit_base_patch16", pretrained=True,
                              pretrained_cfg_overlay=dict(file="export/model.safetensors"))

The models follow timm's ViT conventions: ``forward_features`` -> (B, 1+L, D) tokens,
``forward_head(x, pre_logits=False)``, ``forward_intermediates`` (NCHW maps), ``num_features``,
``reset_classifier``, ``features_only=True``, ``group_matcher`` (layer decay) and gradient
checkpointing. Any image whose sides are multiples of the patch size works: the relative position
encoding needs no interpolation.

Pooling (``global_pool='avg'``, the default) follows the LoMaR finetuning recipe. Without a
classifier (``num_classes=0``, the default for an encoder's weights) the final LayerNorm is applied to
the tokens and ``forward`` returns their mean patch token, exactly like
``lomar.VisionTransformer``. With a classifier the final norm moves after pooling (``fc_norm``, as in
timm's and MAE's finetuned ViTs): ``forward_features`` then returns un-normed tokens and the logits
equal those of our finetuned classifier.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from timm.layers import global_pool_nlc, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from lomar.checkpoints.export import header_shapes
from lomar.checkpoints.keys import encoder_keys, position_encoding
from lomar.checkpoints.keys_beit import holds_beit_keys
from lomar.checkpoints.kinds import classifier_pool
from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lomar.models.vit import MODEL_SIZES, PATCH_SIZES, VisionTransformer, ViTConfig
from lomar.values import is_size

__all__ = ["LomarVisionTransformer", "checkpoint_filter_fn"]

_log = logging.getLogger("lomar.integrations.timm")
_POOLS = ("", "avg", "token", "max")


class LomarVisionTransformer(VisionTransformer):
    """``lomar.VisionTransformer`` with timm's model interface (same parameter names)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 0, global_pool: str = "avg", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, pos: str = "rpe", fc_norm: bool | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, attention: str = "auto",
                 window_size: int = 0, global_blocks: tuple[int, ...] = (), dynamic_img_size: bool = False,
                 device=None, dtype=None):
        # any input whose sides are multiples of the patch size works either way (an absolute table is resampled
        # per forward): timm's dynamic_img_size is taken (it raised TypeError) and changes nothing
        if isinstance(img_size, (tuple, list)) and is_size(img_size):  # else ViTConfig's message names it
            img_size = img_size[0] if img_size[0] == img_size[1] else img_size
        config = ViTConfig(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, pos=pos,
                           drop_path=drop_path_rate, attention=attention, window_size=window_size,
                           global_blocks=tuple(global_blocks))
        super().__init__(config, num_classes=0)
        self.in_chans, self.dynamic_img_size = in_chans, True
        self.num_prefix_tokens = 1
        self.has_class_token = True
        self.num_features = self.head_hidden_size = embed_dim
        use_fc_norm = (global_pool == "avg" and num_classes > 0) if fc_norm is None else fc_norm
        if use_fc_norm:
            self.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes, global_pool)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    # ---- timm housekeeping (no_weight_decay, group_matcher, set_grad_checkpointing: the base class's)
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes > 0:
            ref = self.cls_token
            self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()

    # ---- forward -----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, 1+Hg·Wg, D), cls first; normed unless fc_norm is used."""
        tokens, grid = self.embed(x)
        return self.norm(self.forward_blocks(tokens, grid, grad_checkpointing=self._checkpointing()))

    def _checkpointing(self) -> bool:
        # timm's convention: checkpoint only while training (the base class: whenever grads flow).
        return self.grad_checkpointing and self.training and not torch.jit.is_scripting()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(global_pool_nlc(x, self.global_pool, self.num_prefix_tokens)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Block outputs as feature maps (timm convention).

        indices: last n blocks if an int, all if None, else these block indices (negative from
        the end). Returns the list of (B, D, Hg, Wg) maps (``'NLC'``: (B, Hg·Wg, D)), with the cls
        token alongside each if ``return_prefix_tokens``; unless ``intermediates_only``, returns
        ``(final normed tokens, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.blocks), indices)
        embedded, grid = self.embed(x)
        outputs = []
        for i, tokens in self.iter_blocks(embedded, grid, grad_checkpointing=self._checkpointing(),
                                          stop=last + 1 if stop_early else None):
            if i in take:
                outputs.append(self.norm(tokens) if norm else tokens)
        prefix = [y[:, :1] for y in outputs]
        maps = [y[:, 1:] for y in outputs]
        if output_fmt == "NCHW":
            maps = [y.reshape(y.shape[0], *grid, y.shape[-1]).permute(0, 3, 1, 2).contiguous() for y in maps]
        if return_prefix_tokens:
            maps = list(zip(maps, prefix))
        if intermediates_only:
            return maps
        return self.norm(tokens), maps

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, last = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: LomarVisionTransformer,
                         strict: bool = True) -> dict:
    """Any of our or the original weights -> the keys of ``model``.

    Accepts an exported encoder or classifier (``lomar export``), the ``model`` of our LoMaR / MAE
    pretraining checkpoint (``encoder.*``), and original LoMaR / MAE state dicts (their pixel head,
    mask token and decoder are dropped). A classifier head and ``fc_norm`` missing from the
    weights or of another shape keep the model's fresh initialisation; ``strict`` (timm's
    ``pretrained_strict``): any other missing weight is an error.
    """
    state = state_dict.get("model", state_dict) if isinstance(state_dict.get("model"), dict) else state_dict
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    if holds_beit_keys(state):  # else read as a ViT's: "pos='none'", or a q_bias that "does not fit"
        raise ValueError("these are BEiT weights (a BEiT export or checkpoint), which no lomar_vit_* model holds; "
                         "load a BEiT export as timm's Beit: timm.create_model('local-dir:DIR', pretrained=True)")
    weights = encoder_keys(state)
    # an MAE table would be dropped by an RPE or pos='none' model (which keeps none), or leave its tables unloaded
    if strict and "blocks.0.attn.qkv.weight" in weights and (pos := position_encoding(weights)) != model.config.pos:
        raise ValueError(f"these weights encode positions with pos={pos!r}, this model with pos={model.config.pos!r}; "
                         f"pass pos={pos!r} to timm.create_model (as an export's config.json model_args say), or "
                         f"create it from the export folder: timm.create_model('local-dir:DIR', pretrained=True)")
    for key, value in weights.items():
        if not value.is_floating_point() or value.dtype.itemsize < 2:  # loading would cast it into a weight
            raise ValueError(f"weight {key} is {value.dtype}, which no weights are saved in; pass an encoder's "
                             f"weights (float32, float16, bfloat16 or float64), or re-export it with `lomar export`")
        if key == "pos_embed" and key in own:  # resampled from the grid a sin-cos table names, as every loader does
            value = model.fit_pos_embed(value)
        # a stem for other input channels (in_chans=1): timm's load_pretrained adapts it after this filter
        other_chans = key == "patch_embed.proj.weight" and key in own and value.ndim == 4 and \
            own[key].shape[:1] + own[key].shape[2:] == value.shape[:1] + value.shape[2:]
        if (key not in own or own[key].shape != value.shape) and not other_chans:
            if key.startswith(("head.", "fc_norm.", "norm.", "pos_embed")):
                continue  # classifier/norm layout chosen by the model's args; an RPE model has no pos_embed
            raise ValueError(f"weight {key} {tuple(value.shape)} does not fit this model"
                             + (f" ({tuple(own[key].shape)})" if key in own else "")
                             + "; create the model with the exported architecture (see config.json's model_args)")
        out[key] = value
    # a classifier's weights (fc_norm, no final norm) give an encoder a fresh final norm, as lomar's loader does
    from_classifier = any(k.startswith("fc_norm.") for k in weights)
    fresh = [k for k in own if k not in out and k.startswith(("head.", "fc_norm.", "pos_embed")
                                                              + (("norm.",) if from_classifier else ()))]
    out.update({key: own[key] for key in fresh})
    if strict and (missing := [k for k in own if k not in out]):
        raise ValueError(f"the weights lack {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} of this "
                         f"model; create the model with the exported architecture (see config.json's model_args)")
    if any(k.startswith("head.") for k in fresh):
        _log.info("classifier head not in the weights (or of another size): freshly initialised")
    return out


_CFG = dict(url="", num_classes=0, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
            interpolation="bicubic", fixed_input_size=False, mean=IMAGENET_MEAN,
            std=IMAGENET_STD, first_conv="patch_embed.proj", classifier=None,
            license="apache-2.0", paper_name="Efficient Self-supervised Vision Pretraining with "
            "Local Masked Reconstruction", paper_ids="arXiv:2206.00790")
# Every registered name and the architecture it stands for (kwargs override it).
_VARIANTS = {f"lomar_vit_{size}_patch{patch}": dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads)
             for size, (dim, depth, heads) in MODEL_SIZES.items() for patch in PATCH_SIZES}
default_cfgs = generate_default_cfgs({variant: dict(_CFG) for variant in _VARIANTS})


def _with_weights_head(kwargs: dict) -> dict:
    """``kwargs`` with the head of the classifier a ``pretrained_cfg_overlay`` file holds (an export's weights) where
    the caller names no ``num_classes``: its rows as the pretrained cfg's ``num_classes``, which timm gives the model
    unless the caller passes another (a folder's config.json says it for ``local-dir:``; the name's cfg says 0), and
    its pooling unless given (:func:`~lomar.checkpoints.kinds.classifier_pool`). Only a guess, which refuses nothing:
    a file whose header it cannot take is left to the load, which drops what no encoder holds (a decoder's tensors)."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    file = overlay.get("file")
    if kwargs.get("pretrained_cfg") or "num_classes" in overlay or not str(file or "").endswith(".safetensors"):
        return kwargs
    if not Path(file).is_file():  # timm's own loader names a missing file
        return kwargs
    try:
        shapes = encoder_keys(header_shapes(Path(file)))
    except ValueError:  # an integer tensor (one the load drops, BEiT's index table) or no safetensors: the load's word
        return kwargs
    if len(rows := shapes.get("head.weight", ())) != 2:
        return kwargs
    pool = "token" if classifier_pool({}, shapes) == "cls" else "avg"
    return {"global_pool": pool, **kwargs, "pretrained_cfg_overlay": {**overlay, "num_classes": rows[0]}}


def _register(variant: str) -> None:
    """One timm constructor per size and patch, named as timm lists it (``timm.list_models('lomar_*')``)."""
    def constructor(pretrained: bool = False, **kwargs) -> LomarVisionTransformer:
        if pretrained:
            kwargs = _with_weights_head(kwargs)
        args = {**_VARIANTS[variant], **kwargs}  # features_only: the last 3 blocks, or all of a shallower encoder
        strict = kwargs.get("pretrained_strict", True)
        return build_model_with_cfg(LomarVisionTransformer, variant, pretrained,
                                    pretrained_filter_fn=functools.partial(checkpoint_filter_fn, strict=strict),
                                    feature_cfg=dict(feature_cls="getter", out_indices=min(3, args["depth"])), **args)

    constructor.__name__ = constructor.__qualname__ = variant
    constructor.__doc__ = f"LoMaR's ViT {variant.removeprefix('lomar_vit_')}; kwargs go to the model."
    globals()[variant] = register_model(constructor)


for _variant in _VARIANTS:
    _register(_variant)
