"""Plain ViT encoder with contextual RPE (LoMaR), 2-D sin-cos APE (MAE) or no position; an encoder
without RPE may also carry a dense task's relative position term (``ViTConfig.rel_pos``).

Tokens are always [cls] + spatial tokens in raster order. ``VisionTransformer`` embeds a
whole image (finetuning, MAE, features); LoMaR reuses its parts on window tokens only.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lomar.models.abs_pos import sincos_pos_embed_2d, table_for_grid
from lomar.models.attention import ATTENTION_MODES, biased_attention, rpe_attention, windowed_attention
from lomar.models.masking import grid_size, tile_grid
from lomar.models.relpos import decomposed_rows, table_rows
from lomar.models.rpe import ContextualRPE
from lomar.models.vit_config import MODEL_SIZES, PATCH_SIZES, EncoderShape, ViTConfig, list_models, model_config
from lomar.values import is_integer

__all__ = [
    "ViTConfig",
    "EncoderShape",
    "MODEL_SIZES",
    "PATCH_SIZES",
    "model_config",
    "list_models",
    "PatchEmbed",
    "Attention",
    "Block",
    "VisionTransformer",
]


def layout_fix(shape: torch.Size, chans: int = 3) -> str:
    """The one-call fix of a batch of ``chans``-channel images held in another layout, where there is one: '' else."""
    if len(shape) == 3 and shape[0] == chans:  # one image, as a dataset returns it
        return "; add the batch dimension (images[None])"
    if len(shape) == 4 and shape[-1] == chans and shape[1] != chans:  # PIL, numpy and matplotlib's H, W, C
        return "; channels come first: images.permute(0, 3, 1, 2)"
    # an RGBA or grey batch (torchvision.io reads a PNG as it is stored) has a one-call fix
    if len(shape) == 4 and chans == 3 and shape[1] in (1, 4):
        return "; drop an alpha channel (images[:, :3]) or repeat a grey one (images.expand(-1, 3, -1, -1))"
    return ""


class PatchEmbed(nn.Module):
    """Conv patch embedding; ``embed_patches`` applies it to pixels already cut into patches."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, Hg·Wg, D)."""
        return self.proj(images).flatten(2).transpose(1, 2)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., C·p·p) patches in (channel, row, col) order -> (..., D); same as the conv."""
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)

    def check_images(self, images: torch.Tensor) -> None:
        """ValueError unless ``images`` are on the weights' device and floats of their dtype (any floats under
        autocast)."""
        weight = self.proj.weight
        if images.device != weight.device:  # else torch names neither tensor nor the fix, deep in the conv
            raise ValueError(f"images are on {images.device} but the model's weights are on {weight.device}: move "
                             f"them with images.to({str(weight.device)!r}) (or the model with model.to(...))")
        if not images.is_floating_point():  # pixels as decoded (0-255): the scaling and normalising both lack
            raise ValueError(f"images are {images.dtype} but the model's weights are {weight.dtype}: pass float "
                             f"images normalised with the ImageNet mean and std, "
                             f"torchvision.transforms.v2.functional.normalize(images / 255, IMAGENET_MEAN, "
                             f"IMAGENET_STD) (from lomar.data.transforms) for 0-255 pixels")
        if images.dtype != weight.dtype and not torch.is_autocast_enabled(images.device.type):
            raise ValueError(f"images are {images.dtype} but the model's weights are {weight.dtype}: pass float "
                             f"images normalised with the ImageNet mean and std, as {weight.dtype} (or run under "
                             f"torch.autocast)")


class Attention(nn.Module):
    """Multi-head self-attention; with RPE the contextual bias enters SDPA as an additive mask.

    ``rel_pos`` (an encoder without RPE, for dense transfer): ``decomposed`` owns ViTDet's per-axis
    tables ``rel_pos_h`` / ``rel_pos_w`` (2S−1, head_dim) for ``rel_pos_size`` (S, S'), ``bias``
    mmsegmentation's per-block table ``relative_position_bias_table`` for a grid of that size; both
    zero-initialised (:mod:`lomar.models.relpos`).
    """

    def __init__(self, dim: int, num_heads: int, rpe: bool, rel_pos: str = "none",
                 rel_pos_size: tuple[int, int] = (1, 1)):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads; pick a divisor of {dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rpe = ContextualRPE(dim // num_heads) if rpe else None
        self.rel_pos, self.rel_pos_size = rel_pos, tuple(rel_pos_size)
        height, width = self.rel_pos_size
        if rel_pos == "decomposed":
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * height - 1, dim // num_heads))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * width - 1, dim // num_heads))
        elif rel_pos == "bias":
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * height - 1) * (2 * width - 1) + 3,
                                                                         num_heads))

    def position_rows(self, q: torch.Tensor, grid: tuple[int, int]):
        """The ``rel_pos`` term for queries q (B, h, 1+H·W, d) on ``grid``, as rows
        (:data:`lomar.models.relpos.BiasRows`)."""
        if self.rel_pos == "decomposed":
            return decomposed_rows(q, self.rel_pos_h, self.rel_pos_w, grid)
        return table_rows(self.relative_position_bias_table, self.rel_pos_size, grid)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor | None = None, grid: tuple[int, int] | None = None,
                mode: str = "auto", key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D).

        Either ``buckets`` (L, L) from ``bucket_table`` (the dense bias), or the ``grid`` the
        [cls]+tokens lie on and an attention ``mode`` (:func:`lomar.models.attention.rpe_attention`;
        ``key_bias`` (B, 1, 1, L) masks keys). Without RPE neither is needed, except for ``rel_pos``,
        which needs the ``grid`` (and takes the ``mode``: :func:`lomar.models.attention.biased_attention`).
        """
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.rel_pos != "none":
            if grid is None:
                raise ValueError(f"rel_pos={self.rel_pos!r} needs the grid of the [cls]+tokens")
            out = biased_attention(q, k, v, self.position_rows(q, grid), mode, key_bias)
        elif grid is not None and buckets is None:
            table = self.rpe.table[0] if self.rpe is not None else None
            out = rpe_attention(q, k, v, table, grid, mode, key_bias)
        else:
            bias = self.rpe(q, buckets) if self.rpe is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))


class Mlp(nn.Sequential):
    """fc1 -> exact GELU -> fc2 (timm's key names, so timm ViT weights line up)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, rpe: bool = False,
                 drop_path: float = 0.0, rel_pos: str = "none", rel_pos_size: tuple[int, int] = (1, 1)):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, rpe, rel_pos, rel_pos_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if drop_path > 0:
            # timm imports torchvision and with it torch._dynamo (about a second): only for a model that uses it
            from timm.layers import DropPath

            self.drop_path = DropPath(drop_path)
        else:
            self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor, buckets: torch.Tensor | None = None, grid: tuple[int, int] | None = None,
                mode: str = "auto", window: int = 0) -> torch.Tensor:
        """x (B, 1+H·W, D) [cls]+tokens on ``grid`` -> (B, 1+H·W, D); ``buckets`` as :class:`Attention`.

        ``window`` > 0 (with ``grid``): attention inside window×window tiles of the grid (see
        :func:`lomar.models.attention.windowed_attention`).
        """
        h = self.norm1(x)
        if window and grid is not None:
            h = windowed_attention(self.attn, h, grid, window, mode)
        else:
            h = self.attn(h, buckets, grid, mode)
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, zero biases (LayerNorms keep their unit default)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, PatchEmbed):
        nn.init.xavier_uniform_(module.proj.weight.view(module.proj.weight.shape[0], -1))


class VisionTransformer(nn.Module):
    """ViT encoder (and optional classifier: mean-pooled patch tokens + fc_norm + linear head)."""

    def __init__(self, config: ViTConfig, num_classes: int = 0, global_pool: str = "avg"):
        super().__init__()
        ViTConfig.require(config)
        if global_pool not in ("avg", "cls"):
            raise ValueError(f"global_pool must be avg or cls, got {global_pool!r}")
        self.global_pool = global_pool
        self.config = config
        c = config
        if c.pos not in ("rpe", "abs", "none"):
            raise ValueError(f"unknown position encoding {c.pos!r}; choose rpe, abs or none")
        if c.attention not in ATTENTION_MODES:
            raise ValueError(f"unknown attention {c.attention!r}; choose one of {', '.join(ATTENTION_MODES)}")
        if not is_integer(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no head), got {num_classes!r}")
        if outside := [i for i in c.global_blocks if not 0 <= i < c.depth]:
            raise ValueError(f"global blocks {outside} are not blocks of this {c.depth}-block encoder (global_blocks "
                             f"takes indices 0..{c.depth - 1})")
        sides = (c.img_size,) if isinstance(c.img_size, int) else c.img_size
        if any(side % c.patch_size for side in sides):  # grid_size's words are for images, not this parameter
            fits = "x".join(str(max(1, side // c.patch_size) * c.patch_size) for side in sides)
            raise ValueError(f"img_size {'x'.join(map(str, sides))} is not divisible by the encoder's patch_size "
                             f"{c.patch_size}; use a multiple of {c.patch_size} (e.g. {fits})")
        self.grad_checkpointing = False  # recompute each block in the backward pass (set_grad_checkpointing)
        self.grid = grid_size(c.img_size, c.patch_size)
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        if c.pos == "abs":  # sin-cos; pretraining keeps it fixed (freeze_pos_embed), finetuning trains it as MAE's
            self.pos_embed = nn.Parameter(sincos_pos_embed_2d(c.embed_dim, self.grid)[None])
        else:
            self.pos_embed = None
        rates = torch.linspace(0, c.drop_path, c.depth, device="cpu").tolist()  # under meta too
        # ViTDet sizes a block's relative position tables by the grid it attends over: its window, or the image's
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, rpe=c.pos == "rpe", drop_path=r, rel_pos=c.rel_pos,
                  rel_pos_size=self.block_grid(i))
            for i, r in enumerate(rates)
        )
        # An avg-pooling classifier pools un-normed patch tokens into fc_norm (SPEC §3), as the
        # original, which deletes this norm; a parameter without gradient would also break DDP.
        # A cls-token classifier keeps it (norm -> cls token -> head).
        avg_head = num_classes and global_pool == "avg"
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6) if not avg_head else nn.Identity()
        self.num_classes = num_classes
        if avg_head:
            self.fc_norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        if num_classes:
            self.head = nn.Linear(c.embed_dim, num_classes)
        self.apply(init_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        if num_classes:
            nn.init.trunc_normal_(self.head.weight, std=2e-5)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def spec_args(self) -> dict:
        """Its constructor arguments beside the config, for its model spec (:mod:`lomar.models.spec`)."""
        return {"num_classes": self.num_classes, "global_pool": self.global_pool}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping: the stem, one group per block, and what neither matches (the final
        ``norm`` or ``fc_norm``, the head) as the top one, MAE's ``get_layer_id_for_vit``. It drives timm's
        layer-wise lr decay (``param_groups_layer_decay``)."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=r"^blocks\.(\d+)")

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}  # ViTDet and mmsegmentation decay the relative position tables

    def freeze_pos_embed(self) -> None:
        """Keep the absolute sin-cos table fixed, as MAE's pretraining does (its finetuning trains it)."""
        if self.pos_embed is not None:
            self.pos_embed.requires_grad_(False)

    def fit_pos_embed(self, table: torch.Tensor, source: tuple[int, int] | None = None) -> torch.Tensor:
        """A saved absolute table (1, 1+N, D) of the ``source`` grid for this model's grid, resampled as
        :meth:`pos_embed_for` resamples at another input size (:func:`table_for_grid`), MAE's fixed sin-cos too:
        built at one size or run at it, the same model."""
        return table_for_grid(table, self.grid, source)

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Absolute table (1, 1+Hg·Wg, D) for a grid, bicubically interpolated if needed (:func:`table_for_grid`)."""
        return table_for_grid(self.pos_embed, grid, self.grid)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass: activations of one block live at a time."""
        self.grad_checkpointing = enable

    def block_window(self, index: int) -> int:
        """Window side of block ``index`` (0: global attention)."""
        c = self.config
        return 0 if index in c.global_blocks else c.window_size

    def block_grid(self, index: int) -> tuple[int, int]:
        """The grid block ``index`` attends over at the configured image size: its window, or the whole grid."""
        window = self.block_window(index)
        return (window, window) if 0 < window < max(self.grid) else self.grid

    def iter_blocks(self, x: torch.Tensor, grid: tuple[int, int], attention: str | None = None,
                    grad_checkpointing: bool | None = None, stop: int | None = None
                    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Run the blocks on [cls]+tokens (B, 1+N, D); yield (index, output (B, 1+N, D)) per block.

        ``grid``: the (H, W) the N tokens lie on, raster order (the RPE buckets; windows). Tokens
        that are a subset of the grid (MAE's visible patches) need absolute position and no
        windows. ``attention`` overrides ``config.attention``; ``grad_checkpointing`` the
        encoder's flag (used only while gradients are enabled); ``stop``: blocks [0, stop) only.
        """
        mode = attention or self.config.attention
        ckpt = self.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
        ckpt = ckpt and torch.is_grad_enabled()
        full = x.shape[1] == 1 + grid[0] * grid[1]
        if not full and (self.config.pos == "rpe" or self.config.rel_pos != "none"):
            raise ValueError(f"{x.shape[1]} tokens are not [cls] + the {grid[0]}x{grid[1]} grid; relative "
                             f"position needs every token of the grid")
        for i, block in enumerate(self.blocks[:stop]):
            window = self.block_window(i) if full else 0
            if window >= max(grid):  # one tile holds the grid: global attention is the same, unpadded
                window = 0
            args = (None, grid if full else None, mode, window)
            x = checkpoint(block, x, *args, use_reentrant=False) if ckpt else block(x, *args)
            yield i, x

    def forward_blocks(self, x: torch.Tensor, grid: tuple[int, int], attention: str | None = None,
                       grad_checkpointing: bool | None = None) -> torch.Tensor:
        """[cls]+tokens (B, 1+N, D) on ``grid`` -> last block's output (not normed); see :meth:`iter_blocks`."""
        out = x
        for _, out in self.iter_blocks(x, grid, attention, grad_checkpointing):  # noqa: B007
            pass
        return out

    def image_grid(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid of a batch (N, C, H, W); TypeError for what is no tensor, ValueError for a wrong rank, channels,
        size, dtype or device, naming the fix."""
        if not isinstance(images, torch.Tensor):  # a numpy array would fail on an attribute torch's tensors have
            raise TypeError(f"images must be a torch.Tensor (N, {self.config.in_chans}, H, W), got "
                            f"{type(images).__name__}; convert it with torch.as_tensor(images)")
        if images.ndim != 4 or images.shape[1] != self.config.in_chans:
            raise ValueError(f"expected images of shape (N, {self.config.in_chans}, H, W), got "
                             f"{tuple(images.shape)}{layout_fix(images.shape, self.config.in_chans)}")
        self.patch_embed.check_images(images)
        return tile_grid(*images.shape[-2:], self.config.patch_size)

    def prepare_tokens(self, inputs: torch.Tensor, grid: tuple[int, int] | None = None,
                       token_index: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding + [cls] + absolute position (if any): -> (B, 1+N, D).

        inputs: images (B, C, H, W), or pixels already cut into patches (B, N, C·p·p) (channel,
        row, col order). grid: the image's patch grid (default: the images'). token_index
        (B, N): grid positions (raster) of the tokens to keep (images) or of the given patches;
        default all, in order. mask (B, N) bool: tokens replaced by ``mask_token`` (1, 1, D)
        before position is added.
        """
        if inputs.ndim == 4:
            grid = self.image_grid(inputs)
            x = self.patch_embed(inputs)
            if token_index is not None:
                x = x.gather(1, token_index[..., None].expand(-1, -1, x.shape[-1]))
        else:
            if grid is None:
                raise ValueError("patch inputs (B, N, C·p·p) need the image's patch grid")
            x = self.patch_embed.embed_patches(inputs)
        if mask is not None:
            x = torch.where(mask[..., None], mask_token.to(x.dtype), x)
        cls = self.cls_token
        if self.pos_embed is not None:
            table = self.pos_embed_for(grid)[0].to(x.dtype)  # (1+Hg·Wg, D)
            x = x + (table[1:] if token_index is None else table[1:][token_index])
            cls = cls + table[:1]
        return torch.cat([cls.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> [cls]+patch tokens (B, 1+Hg·Wg, D) with APE added, and the grid."""
        grid = self.image_grid(images)  # first: a wrong rank is named as such
        return self.prepare_tokens(images, grid), grid

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, 1+Hg·Wg, D), cls first: normed, except in an averaging classifier
        (``num_classes > 0``, ``global_pool='avg'``), whose norm is ``fc_norm`` after pooling."""
        x, grid = self.embed(images)
        return self.norm(self.forward_blocks(x, grid))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Classifier (SPEC §3): mean of un-normed patch tokens -> fc_norm -> head, (B, classes);
        with ``global_pool='cls'``: normed cls token -> head. Without a head (``num_classes=0``)
        returns the normed mean patch token (B, D).
        """
        x, grid = self.embed(images)
        x = self.forward_blocks(x, grid)
        if not self.num_classes:
            return self.norm(x)[:, 1:].mean(dim=1)
        if self.global_pool == "cls":
            return self.head(self.norm(x)[:, 0])
        return self.head(self.fc_norm(x[:, 1:].mean(dim=1)))
