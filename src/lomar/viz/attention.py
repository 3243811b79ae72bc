"""Attention inside a window (the paper's Fig. 1 view): how much each block's target patch attends
to each of its K×K window neighbours.

The encoder's fast path (SDPA) never forms the attention probabilities; :func:`attention_probs`
recomputes them from a block's own ``qkv`` and RPE modules, softmax(q·kᵀ·d^-½ + B_rpe), so the
normal forward pays nothing for this figure. A BEiT encoder's blocks get theirs the same way
(:func:`beit_attention_probs`: its q/v biases and relative position bias).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lomar.models.beit import Attention as BEiTAttention
from lomar.models.beit import BEiT
from lomar.models.lomar import LoMaR
from lomar.models.masking import num_masked, window_token_index
from lomar.models.modes import eval_mode
from lomar.models.rpe import bucket_table
from lomar.models.vit import Attention, VisionTransformer
from lomar.viz.reconstruction import save_figure
from lomar.window_counts import PAPER_WINDOW

__all__ = ["attention_probs", "beit_attention_probs", "block_attention", "windowed_blocks", "WindowAttention",
           "default_window", "attention_request", "window_attention", "attention_figure", "draw_attention"]


def attention_probs(attn: Attention, x: torch.Tensor, buckets: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities of one attention module: x (B, L, D) normed input -> (B, h, L, L)."""
    b, length, _ = x.shape
    q, k, _ = attn.qkv(x).view(b, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if attn.rpe is not None:
        logits = logits + attn.rpe(q, buckets)
    return logits.softmax(dim=-1)


def beit_attention_probs(attn: BEiTAttention, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities of a BEiT attention module: x (B, L, D) normed input, bias (h, L, L) of its
    block (shared and own relative position terms) or None -> (B, h, L, L)."""
    b, length, _ = x.shape
    qkv_bias = None if attn.q_bias is None else torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, qkv_bias).view(b, length, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    return (logits if bias is None else logits + bias).softmax(dim=-1)


def _beit_block_attention(beit: BEiT, tokens: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
    shared = beit.rel_pos_bias(grid) if beit.rel_pos_bias is not None else None
    maps, x = [], tokens
    for block, bias in zip(beit.blocks, beit.rel_pos_bias_for_grid(grid)):
        maps.append(beit_attention_probs(block.attn, block.norm1(x), bias))
        x = block(x, shared, grid)
    return maps


def windowed_blocks(encoder: VisionTransformer | BEiT, grid: tuple[int, int]) -> list[int]:
    """The blocks of ``encoder`` that attend inside windows smaller than ``grid`` (ViTDet's layout), whose
    attention maps are not drawn; a BEiT has none."""
    if isinstance(encoder, BEiT):
        return []
    return [i for i in range(len(encoder.blocks)) if 0 < encoder.block_window(i) < max(grid)]


@torch.no_grad()
def block_attention(encoder: VisionTransformer | BEiT, tokens: torch.Tensor,
                    grid: tuple[int, int]) -> list[torch.Tensor]:
    """Run the blocks on [cls]+tokens laid out on ``grid``; attention (B, h, L, L) of every block."""
    if isinstance(encoder, BEiT):
        return _beit_block_attention(encoder, tokens, grid)
    if windowed_blocks(encoder, grid):
        raise ValueError("attention maps of windowed blocks are not drawn; use an encoder with window_size=0")
    buckets = bucket_table(grid, tokens.device) if encoder.config.pos == "rpe" else None
    maps, x = [], tokens
    for i, out in encoder.iter_blocks(tokens, grid, grad_checkpointing=False):
        block = encoder.blocks[i]
        maps.append(attention_probs(block.attn, block.norm1(x), buckets))
        x = out
    return maps


@dataclass
class WindowAttention:
    """Mean-over-heads attention of one target patch, per block.

    maps (depth, K, K): attention paid to each window patch; cls (depth,): to the cls token;
    inside (depth,): to the whole window. ``context`` is ``'window'`` (the encoder saw only
    cls + the window, as in LoMaR pretraining) or ``'image'`` (it saw the whole image).
    """

    maps: torch.Tensor
    cls: torch.Tensor
    inside: torch.Tensor
    top_left: tuple[int, int]
    target: tuple[int, int]
    window_size: int
    context: str
    mask: torch.Tensor | None = None  # (K·K,) bool: window tokens replaced by the mask token

    @property
    def target_in_window(self) -> tuple[int, int]:
        return self.target[0] - self.top_left[0], self.target[1] - self.top_left[1]


def default_window(model, grid: tuple[int, int]) -> int:
    """K of the attention window when none is asked for: a LoMaR model's own window size, else
    :data:`lomar.window_counts.PAPER_WINDOW` (the paper's K) capped to the patch grid (a small model's grid may hold
    less)."""
    return model.window_size if isinstance(model, LoMaR) else min(PAPER_WINDOW, *grid)


def attention_request(model, grid: tuple[int, int], target: tuple[int, int] | None = None,
                      window_size: int | None = None, context: str | None = None,
                      masked: bool = False) -> tuple[int, str, tuple[int, int]]:
    """(K, context, target) of :func:`window_attention` on a ``grid`` of patches, defaults filled in;
    ValueError naming what does not fit (checked before any figure is drawn)."""
    is_lomar = isinstance(model, LoMaR)
    k = window_size or default_window(model, grid)
    context = context or ("window" if is_lomar else "image")
    if context not in ("window", "image"):
        raise ValueError(f"context must be 'window' or 'image', got {context!r}")
    if masked and not (is_lomar and context == "window"):
        raise ValueError("masked attention needs a LoMaR model in window context (it has the mask token)")
    if k > min(grid):
        raise ValueError(f"a {k}x{k} window does not fit the {grid[0]}x{grid[1]} patch grid; "
                         f"pass window_size={min(grid)} or less")
    target = target if target is not None else (grid[0] // 2, grid[1] // 2)
    if not (0 <= target[0] < grid[0] and 0 <= target[1] < grid[1]):
        raise ValueError(f"target patch {tuple(target)} is outside the {grid[0]}x{grid[1]} patch grid")
    return k, context, tuple(target)


@torch.no_grad()
def window_attention(model, image: torch.Tensor, target: tuple[int, int] | None = None,
                     window_size: int | None = None, context: str | None = None, masked: bool = False,
                     seed: int = 0) -> WindowAttention:
    """Attention of patch ``target`` (row, col in the image's patch grid; default: the centre).

    model: a LoMaR / MAE model, a VisionTransformer or a BEiT; image (3, H, W) normalised. The window
    is K×K around the target: ``window_size``, by default :func:`default_window` (a LoMaR
    model's own K, else 7 or the patch grid's side if smaller).
    ``context``: ``'window'`` (default for LoMaR) runs the encoder on cls + the window tokens
    only; ``'image'`` (default otherwise) on the whole image. ``masked`` (window context):
    replace floor(K·K·mask_ratio) window tokens, the target among them, by the mask token.
    """
    encoder: VisionTransformer | BEiT = getattr(model, "encoder", model)
    p = encoder.config.patch_size
    grid = (image.shape[-2] // p, image.shape[-1] // p)
    k, context, target = attention_request(model, grid, target, window_size, context, masked)
    # the K×K window centred on the target, shifted to fit inside the grid
    top, left = min(max(target[0] - k // 2, 0), grid[0] - k), min(max(target[1] - k // 2, 0), grid[1] - k)
    ty, tx = target[0] - top, target[1] - left
    with eval_mode(encoder):
        images = image[None].to(encoder.cls_token.device, encoder.cls_token.dtype)
        mask = None
        if context == "window":
            index = window_token_index(torch.tensor([top, left], device=images.device), k, grid[1])  # (K·K,)
            x = encoder.patch_embed(images)[:, index]
            if masked:
                gen = torch.Generator().manual_seed(seed)
                keys = torch.rand(k * k, generator=gen)
                keys[ty * k + tx] = -1.0  # the target is always among the masked tokens
                mask = torch.zeros(k * k, dtype=torch.bool)
                mask[keys.topk(num_masked(k, model.mask_ratio), largest=False).indices] = True
                x = torch.where(mask.to(x.device)[None, :, None], model.mask_token.to(x.dtype), x)
            tokens, token_grid, query, origin = _window_tokens(encoder, x, index, grid), (k, k), ty * k + tx, (0, 0)
        else:
            tokens, token_grid = ((encoder.prepare_tokens(encoder.patch_embed(images)), encoder.grid)
                                  if isinstance(encoder, BEiT) else encoder.embed(images))
            query, origin = target[0] * token_grid[1] + target[1], (top, left)
        rows = [a[0, :, 1 + query].mean(dim=0) for a in block_attention(encoder, tokens, token_grid)]
    r0, c0 = origin
    maps = torch.stack([r[1:].reshape(token_grid)[r0:r0 + k, c0:c0 + k] for r in rows])
    cls_share = torch.stack([r[0] for r in rows])
    return WindowAttention(maps.float().cpu(), cls_share.float().cpu(), maps.flatten(1).sum(1).float().cpu(),
                           (top, left), tuple(int(t) for t in target), k, context, mask)


def _window_tokens(encoder: VisionTransformer | BEiT, x: torch.Tensor, index: torch.Tensor,
                   grid: tuple[int, int]) -> torch.Tensor:
    """[cls] + the window's tokens x (1, K², D) at their places ``index`` (K²,) of the image's ``grid``, with
    the absolute position table (if any) as pretraining on windows adds it -> (1, 1 + K², D)."""
    if isinstance(encoder, BEiT):
        return encoder.prepare_tokens(x, None, index[None])
    cls = encoder.cls_token
    if encoder.pos_embed is not None:
        table = encoder.pos_embed_for(grid)[0]
        x, cls = x + table[1:][index], cls + table[:1]
    return torch.cat([cls.expand(1, -1, -1).to(x.dtype), x], dim=1)


def attention_figure(result: WindowAttention, pixels: torch.Tensor, patch_size: int, path: str | Path,
                     title: str | None = None, columns: int = 7) -> Path:
    """PNG of :func:`draw_attention`: the image with the window, the window's pixels, then one
    heatmap per block. pixels: (3, H, W) in [0, 1] (un-normalised)."""
    return save_figure(draw_attention(result, pixels, patch_size, title, columns), path, dpi=90)


def draw_attention(result: WindowAttention, pixels: torch.Tensor, patch_size: int, title: str | None = None,
                   columns: int = 7):
    """The figure :func:`attention_figure` writes (a :class:`matplotlib.figure.Figure`).

    pixels: (3, H, W) in [0, 1]. Each heatmap shows the mean-over-heads attention of the target
    (cyan square) to every window patch, on its own colour scale from 0 to the block's maximum
    (printed below it, with the shares of the cls token and, for the whole-image context, of the
    window). Constrained layout reserves each caption's height above the next row's titles.
    """
    k, p = result.window_size, patch_size
    (top, left), (ty, tx) = result.top_left, result.target_in_window
    depth = result.maps.shape[0]
    panels = depth + 2
    cols = min(columns, panels)
    rows = -(-panels // cols)
    fig = Figure(figsize=(2.3 * cols, 2.9 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set(xticks=[], yticks=[])
        ax.axis("on" if i < panels else "off")
    img = pixels.permute(1, 2, 0).float().cpu().numpy()
    ax = axes.flat[0]
    ax.imshow(img)
    ax.add_patch(Rectangle((left * p - 0.5, top * p - 0.5), k * p, k * p, fill=False, edgecolor="yellow", lw=1.5))
    ax.add_patch(Rectangle(((left + tx) * p - 0.5, (top + ty) * p - 0.5), p, p, fill=False, edgecolor="cyan", lw=1.5))
    ax.set_title("image, window", fontsize=9)
    ax.set_xlabel(f"target patch ({result.target[0]}, {result.target[1]})", fontsize=8)
    ax = axes.flat[1]
    crop = img[top * p:(top + k) * p, left * p:(left + k) * p].copy()
    masked_rc = [divmod(i, k) for i in result.mask.nonzero().flatten().tolist()] if result.mask is not None else []
    for r, c in masked_rc:  # grey out what the encoder did not see
        cell = crop[r * p:(r + 1) * p, c * p:(c + 1) * p]
        cell[:] = 0.5 + 0.2 * (cell - 0.5)
    ax.imshow(crop, extent=(-0.5, k - 0.5, k - 0.5, -0.5))
    ax.add_patch(Rectangle((tx - 0.5, ty - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=1.5))
    ax.set_title(f"{k}x{k} window" + (" (masked: grey)" if result.mask is not None else ""), fontsize=9)
    for b in range(depth):
        ax = axes.flat[b + 2]
        heat = result.maps[b].numpy()
        ax.imshow(heat, cmap="magma", vmin=0.0, vmax=max(float(heat.max()), 1e-8), interpolation="nearest")
        ax.add_patch(Rectangle((tx - 0.5, ty - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=1.5))
        if masked_rc:  # masked tokens: grey dots
            ax.scatter([c for _, c in masked_rc], [r for r, _ in masked_rc], s=6, c="grey", marker="o")
        ax.set_title(f"block {b + 1}", fontsize=9)
        label = f"max {heat.max():.0%} · cls {float(result.cls[b]):.0%}"
        if result.context == "image":
            label += f"\nin window {float(result.inside[b]):.0%}"
        ax.set_xlabel(label, fontsize=8)
    seen = "cls + window only" if result.context == "window" else "the whole image"
    lines = [title] if title else []
    lines += [f"attention of the target patch (cyan) to its {k}x{k} window, mean over heads",
              f"encoder saw {seen}" + ("; masked tokens: grey dots" if result.mask is not None else ""),
              "colour: 0 (black) to each block's maximum"]
    width = max(30, int(2.3 * cols * 12))  # characters that fit the figure at 10 pt
    text = "\n".join(textwrap.fill(line, width) for line in lines)
    fig.suptitle(text, fontsize=10)
    return fig
