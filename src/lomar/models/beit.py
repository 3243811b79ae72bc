"""BEiT for masked image modeling (Bao et al.), equal to the original pretraining model.

Written from BEIT_SPEC.md §1. Tokens are [cls] + patches in raster order; position comes from a
relative position bias table (shared across blocks in the pretraining recipe, or per block).
Parameter names are the original's, so converting an original checkpoint only drops the
``relative_position_index`` buffers (rebuilt here) and checks shapes (``lomar.checkpoints.keys_beit``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lomar.models.relpos import table_bias
from lomar.models.vit import EncoderShape, PatchEmbed, layout_fix
from lomar.values import is_integer

__all__ = ["BEiTConfig", "BEiT", "BEiTOutput", "RelativePositionBias", "timm_beit_args", "timm_global_pool"]


@dataclass(frozen=True)
class BEiTConfig(EncoderShape):
    """Architecture of a BEiT pretraining model; defaults are beit_base_patch16_224_8k_vocab."""

    qkv_bias: bool = True
    qk_scale: float | None = None  # None: head_dim ** -0.5
    attn_head_dim: int | None = None  # None: embed_dim // num_heads
    norm_eps: float = 1e-6
    init_values: float | None = 0.1  # layer scale γ start; None or 0 = no layer scale
    init_std: float = 0.02
    drop_path_rate: float = 0.1
    use_shared_rel_pos_bias: bool = True
    use_rel_pos_bias: bool = False
    use_abs_pos_emb: bool = False
    vocab_size: int = 8192

    @classmethod
    def from_vit(cls, vit, vocab_size: int) -> BEiTConfig:
        """BEiT's pretraining model for a ViT shape (``vit``: a :class:`~lomar.models.vit.ViTConfig`):
        the ViT's sizes, BEiT's own defaults for everything else, the tokenizer's vocabulary."""
        return cls(**{name: getattr(vit, name) for name in EncoderShape.__dataclass_fields__}, vocab_size=vocab_size)

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "vocab_size"):
            value = getattr(self, name)  # BEiT's grid is square: one side, not a (height, width) pair
            if not is_integer(value):
                raise ValueError(f"BEiTConfig.{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy's: a weights-only load refuses them in a checkpoint
        checks = [
            (self.patch_size >= 1 and self.img_size % self.patch_size == 0,
             f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}; "
             f"use e.g. img_size={max(1, self.img_size // max(1, self.patch_size)) * max(1, self.patch_size)}"),
            (self.embed_dim >= 1 and self.num_heads >= 1
             and (self.attn_head_dim is not None or self.embed_dim % self.num_heads == 0),
             f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; pick heads dividing it"),
            (self.attn_head_dim is None or self.attn_head_dim >= 1,
             f"attn_head_dim={self.attn_head_dim} must be >= 1 or None (= embed_dim // num_heads)"),
            (self.depth >= 1, f"depth={self.depth} must be >= 1"),
            (self.mlp_ratio > 0, f"mlp_ratio={self.mlp_ratio} must be > 0; use 4.0"),
            (self.vocab_size >= 2, f"vocab_size={self.vocab_size} must be >= 2 (the tokenizer's vocabulary)"),
            (self.norm_eps > 0, f"norm_eps={self.norm_eps} must be > 0; the original uses 1e-6"),
            (0 <= self.drop_path_rate < 1, f"drop_path_rate={self.drop_path_rate} must be in [0, 1); use 0.1"),
            (self.init_std > 0, f"init_std={self.init_std} must be > 0; the original uses 0.02"),
            # The original builds γ only for init_values > 0: a negative start would flip every branch's sign.
            (self.init_values is None or self.init_values >= 0,
             f"init_values={self.init_values} must be >= 0 or None (0 or None: no layer scale); BEiT-base uses 0.1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("mlp_ratio", "norm_eps", "init_std", "drop_path_rate", "init_values", "qk_scale", "attn_head_dim"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                object.__setattr__(self, name, int(value) if name == "attn_head_dim" else float(value))

    @property
    def grid(self) -> tuple[int, int]:
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def _zero_table(grid: tuple[int, int], num_heads: int) -> nn.Parameter:
    # Zeros: the original leaves its trunc_normal init commented out.
    return nn.Parameter(torch.zeros((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, num_heads))


class RelativePositionBias(nn.Module):
    """The shared table, added in every block: bias (heads, L+1, L+1) for any grid ≤ the built one."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        self.grid = tuple(grid)
        self.relative_position_bias_table = _zero_table(self.grid, num_heads)

    def forward(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return table_bias(self.relative_position_bias_table, self.grid, grid)


class Attention(nn.Module):
    """Multi-head self-attention whose qkv bias is [q_bias, 0, v_bias] (keys get no bias).

    With ``grid`` it owns a relative position table (the original's per-block bias)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, grid: tuple[int, int] | None,
                 head_dim: int | None = None, qk_scale: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.head_dim * num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.grid = tuple(grid) if grid is not None else None
        self.relative_position_bias_table = _zero_table(self.grid, num_heads) if grid is not None else None
        self.proj = nn.Linear(inner, dim)

    def own_bias(self, grid: tuple[int, int] | None = None) -> torch.Tensor | None:
        """(heads, L+1, L+1) from this block's table, or None without one."""
        if self.relative_position_bias_table is None:
            return None
        return table_bias(self.relative_position_bias_table, self.grid, grid)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x (N, T, D); bias (heads, T, T) or None, added to the logits; T = 1 + Gh·Gw."""
        n, t, _ = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias).view(n, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        own = self.own_bias(grid)
        if own is not None:
            bias = own if bias is None else bias + own
        mask = None if bias is None else bias.to(q.dtype).unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm block with layer scale: x += γ1·Attn(LN(x)); x += γ2·MLP(LN(x))."""

    def __init__(self, config: BEiTConfig, drop_path: float):
        from timm.layers import DropPath, Mlp  # timm imports torchvision and torch._dynamo: only for a BEiT

        super().__init__()
        dim = config.embed_dim
        norm = partial(nn.LayerNorm, eps=config.norm_eps)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias,
                              config.grid if config.use_rel_pos_bias else None,
                              config.attn_head_dim, config.qk_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), act_layer=nn.GELU)
        if config.init_values:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(config.init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(config.init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        a = self.attn(self.norm1(x), bias, grid)
        x = x + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m if self.gamma_2 is None else self.gamma_2 * m)


def check_token_ids(input_ids) -> None:
    """TypeError unless ``input_ids`` is a tensor of integer token ids (any integer dtype: read as int64)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex() \
            or input_ids.dtype == torch.bool:
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be a tensor of integer token ids (torch.long), got {got}")


class BEiTOutput(NamedTuple):
    loss: torch.Tensor | None  # () mean cross-entropy over all masked tokens; None without input_ids
    logits: torch.Tensor  # (M, V) masked tokens in row-major order, or (N, L, V) with return_all_tokens


class BEiT(nn.Module):
    """Masked image modeling: replace masked patch embeddings by ``mask_token``, predict their tokens."""

    def __init__(self, config: BEiTConfig | None = None, **overrides):
        super().__init__()
        config = replace(config or BEiTConfig(), **overrides)
        self.config = config
        dim, p = config.embed_dim, config.patch_size
        self.patch_embed = PatchEmbed(p, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, dim)) if config.use_abs_pos_emb else None
        self.rel_pos_bias = (RelativePositionBias(config.grid, config.num_heads)
                             if config.use_shared_rel_pos_bias else None)
        rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()  # under meta too
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(dim, config.vocab_size)
        self.reset_parameters()

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    def spec_args(self) -> dict:
        """Constructor arguments beyond the config (:mod:`lomar.models.spec`): none."""
        return {}

    def reset_parameters(self) -> None:
        """The original init: trunc-normal cut at ±1 std (not ±2), zero biases, proj/fc2 ÷ √(2l)."""
        from timm.layers import trunc_normal_  # timm imports torchvision and torch._dynamo: only for a BEiT

        std = self.config.init_std
        normal = partial(trunc_normal_, std=std, a=-std, b=std)
        for token in (self.cls_token, self.mask_token, self.pos_embed):
            if token is not None:
                normal(token)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                normal(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            # Keeps the residual stream's variance from growing with depth.
            for layer, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def no_weight_decay(self) -> set[str]:
        """As the original: 1-D tensors are excluded elsewhere; mask_token and rel-pos tables are decayed."""
        return {"pos_embed", "cls_token"}

    def rel_pos_bias_for_grid(self, grid: tuple[int, int] | None = None) -> list[torch.Tensor | None]:
        """The bias each block adds, (heads, L+1, L+1) or None per block, for ``grid`` ≤ the built grid."""
        grid = tuple(grid) if grid is not None else self.grid
        shared = self.rel_pos_bias(grid) if self.rel_pos_bias is not None else None
        out = []
        for block in self.blocks:
            own = block.attn.own_bias(grid)
            out.append(own if shared is None else shared if own is None else shared + own)
        return out

    def _check_inputs(self, images: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> torch.Tensor | None:
        size, chans = self.config.img_size, self.config.in_chans
        if not isinstance(images, torch.Tensor):  # a numpy array would fail on an attribute torch's tensors have
            raise TypeError(f"images must be a torch.Tensor (N, {chans}, {size}, {size}), got "
                            f"{type(images).__name__}; convert it with torch.as_tensor(images)")
        if images.ndim != 4 or images.shape[1] != chans:
            raise ValueError(f"images must be (N, {chans}, {size}, {size}), got {tuple(images.shape)}"
                             f"{layout_fix(images.shape, chans)}")
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"images must be (N, {chans}, {size}, {size}), got {tuple(images.shape)}; resize to "
                             f"img_size={size} or build with that img_size")
        self.patch_embed.check_images(images)
        if bool_masked_pos is None:
            return None
        if bool_masked_pos.ndim == 3:
            bool_masked_pos = bool_masked_pos.flatten(1)
        expected = (images.shape[0], self.config.num_patches)
        if tuple(bool_masked_pos.shape) != expected:
            raise ValueError(f"bool_masked_pos must be (N, L) = {expected} (or (N, Gh, Gw)), got "
                             f"{tuple(bool_masked_pos.shape)}")
        if bool_masked_pos.dtype != torch.bool:
            raise ValueError(f"bool_masked_pos must be torch.bool, got {bool_masked_pos.dtype}; use mask.bool()")
        return bool_masked_pos

    def forward_encoder(self, images: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """images (N, C, H, W), bool_masked_pos (N, L) → (N, 1+L, D) before the final norm."""
        bool_masked_pos = self._check_inputs(images, bool_masked_pos)
        return self.run_blocks(self.prepare_tokens(self.patch_embed(images), bool_masked_pos))

    def prepare_tokens(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
                       token_index: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embeddings (N, T, D) -> [cls] + tokens (N, 1+T, D), masked ones (N, T) replaced by the mask
        token, absolute position (if any) added; ``token_index`` (N, T): the tokens' places in the grid."""
        if bool_masked_pos is not None:
            # Substitution, not addition: masked patches carry no trace of their pixels.
            w = bool_masked_pos.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        if self.pos_embed is not None:
            table = self.pos_embed[0].to(x.dtype)
            x, cls = x + (table[1:] if token_index is None else table[1:][token_index]), cls + table[:1]
        return torch.cat((cls, x), dim=1)

    def run_blocks(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x (N, 1+Gh·Gw, D), cls first, through every block with the relative position bias of
        ``grid`` (default: the built grid; any grid ≤ it, e.g. 7×7 windows of a 14×14 model)."""
        grid = tuple(grid) if grid is not None else self.grid
        if x.shape[1] != 1 + grid[0] * grid[1]:
            raise ValueError(f"{x.shape[1]} tokens do not fit grid {grid[0]}x{grid[1]} plus cls "
                             f"({1 + grid[0] * grid[1]}); pass the grid the tokens come from")
        shared = self.rel_pos_bias(grid) if self.rel_pos_bias is not None else None
        for block in self.blocks:
            x = block(x, shared, grid)
        return x

    def forward_features(self, images: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 1+L, D) after the final LayerNorm, cls first."""
        return self.norm(self.forward_encoder(images, bool_masked_pos))

    @staticmethod
    def masked_labels(input_ids: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """(M,) targets: image by image, raster order within an image (the logits' order)."""
        return input_ids.flatten(1)[bool_masked_pos.flatten(1)]

    def forward(self, images: torch.Tensor, bool_masked_pos: torch.Tensor,
                input_ids: torch.Tensor | None = None, return_all_tokens: bool = False) -> BEiTOutput:
        """images (N, C, H, W), bool_masked_pos (N, L) bool, input_ids (N, L) int64 token per patch.

        logits are (M, V) for the M masked patches, or (N, L, V) with ``return_all_tokens``;
        loss is cross-entropy on the masked patches only, averaged over the batch's M tokens.
        """
        bool_masked_pos = self._check_inputs(images, bool_masked_pos)
        x = self.forward_features(images, bool_masked_pos)[:, 1:]
        all_logits = self.lm_head(x)
        logits = all_logits[bool_masked_pos]
        loss = None
        if input_ids is not None:
            check_token_ids(input_ids)
            if input_ids.flatten(1).shape != bool_masked_pos.shape:
                raise ValueError(f"input_ids must be (N, L) = {tuple(bool_masked_pos.shape)}, got "
                                 f"{tuple(input_ids.shape)}; tokenize the view on the same patch grid")
            if not bool_masked_pos.any():  # cross-entropy over no token: NaN
                raise ValueError("bool_masked_pos masks no patch: the loss (over the masked patches) is undefined; "
                                 "mask some, or leave input_ids out for the logits alone")
            loss = F.cross_entropy(logits.float(), self.masked_labels(input_ids, bool_masked_pos).long())
        return BEiTOutput(loss, all_logits if return_all_tokens else logits)


def timm_beit_args(beit: BEiT | BEiTConfig) -> dict:
    """Constructor arguments of the timm ``Beit`` a BEiT encoder loads into, without a classifier: its export's, and
    the start of a finetuned one's (:class:`~lomar.models.beit_classifier.BEiTClassifier`)."""
    c = beit if isinstance(beit, BEiTConfig) else beit.config
    if c.attn_head_dim is not None or c.qk_scale is not None:
        raise ValueError("timm's Beit has no attn_head_dim / qk_scale; this BEiT cannot be exported to it")
    if c.norm_eps != 1e-6:  # timm's Beit takes no eps: its LayerNorms keep their default, 1e-6
        raise ValueError(f"timm's Beit normalises with eps 1e-6, not this BEiT's norm_eps={c.norm_eps}; this BEiT "
                         f"cannot be exported to it")
    return dict(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim,
                depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias,
                init_values=c.init_values or None, use_abs_pos_emb=c.use_abs_pos_emb,
                use_rel_pos_bias=bool(c.use_rel_pos_bias or c.use_shared_rel_pos_bias),
                use_shared_rel_pos_bias=False, num_classes=0, global_pool="token")


def timm_global_pool(global_pool: str, num_classes: int) -> str:
    """timm ``Beit``'s ``global_pool`` for a head of ``num_classes`` on lomar's pooling (``--global-pool`` avg or cls):
    ``'avg'``, the mean of the un-normed patch tokens into ``fc_norm`` (BEiT's finetuning), for a head on avg; else
    ``'token'``, the normed cls token (without a head: the encoder's normed tokens, its final norm kept)."""
    return "avg" if num_classes and global_pool == "avg" else "token"
