"""MAE baseline (He et al.): global random masking, asymmetric encoder-decoder (SPEC §5)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from lomar.models.abs_pos import sincos_pos_embed_2d
from lomar.models.objective import masked_mse, normalize_targets, patchify
from lomar.models.vit import Block, VisionTransformer, ViTConfig, init_weights
from lomar.values import is_integer, is_real

__all__ = ["MAE", "MAEOutput"]


class MAEOutput(NamedTuple):
    """What :meth:`MAE.forward` gives (a tuple: ``loss, pred, mask = model(images)``).

    loss: () mean squared error over the removed patches. pred: (N, L, p·p·C) the decoder's output for every patch,
    pixels in (row, col, channel) order (:func:`~lomar.models.objective.patchify`), normalised by the patch's
    own mean and std where the model has ``norm_pix_loss``.
    mask: (N, L) float, 1 where the patch was removed (and the loss reads it).
    """

    loss: torch.Tensor  # ()
    pred: torch.Tensor  # (N, L, p·p·C) decoder output for every patch
    mask: torch.Tensor  # (N, L) float, 1 = removed (reconstructed)


class MAE(nn.Module):
    """Encoder on the kept patches + narrow decoder on all patches.

    The encoder must use absolute position (``config.pos='abs'``, fixed sin-cos).
    """

    def __init__(self, config: ViTConfig, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mask_ratio: float = 0.75, norm_pix_loss: bool = True):
        super().__init__()
        ViTConfig.require(config)
        if config.pos != "abs":
            raise ValueError(f"MAE needs absolute position embeddings (pos='abs'), got pos={config.pos!r}")
        if not is_real(mask_ratio) or not 0 < mask_ratio < 1:
            raise ValueError(f"MAE mask_ratio must be a number in (0, 1), got {mask_ratio!r}")
        if not isinstance(norm_pix_loss, bool):  # a str such as "no" would be true
            raise TypeError(f"norm_pix_loss must be True or False, got {norm_pix_loss!r}")
        for name, value in (("decoder_embed_dim", decoder_embed_dim), ("decoder_depth", decoder_depth),
                            ("decoder_num_heads", decoder_num_heads)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"MAE {name} must be a positive integer, got {value!r} (MAE's: 512, 8, 16)")
        if decoder_embed_dim % decoder_num_heads:  # else the decoder's Attention names neither parameter
            raise ValueError(f"MAE decoder_embed_dim {decoder_embed_dim} is not divisible by decoder_num_heads "
                             f"{decoder_num_heads}; pick a divisor of {decoder_embed_dim}")
        self.encoder = VisionTransformer(config)
        self.encoder.freeze_pos_embed()
        self.mask_ratio = float(mask_ratio)  # Python numbers: numpy's would make a checkpoint no safe load reads
        self.norm_pix_loss = norm_pix_loss
        decoder_embed_dim, decoder_depth, decoder_num_heads = (int(decoder_embed_dim), int(decoder_depth),
                                                               int(decoder_num_heads))
        self.decoder_settings = dict(decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                                     decoder_num_heads=decoder_num_heads)
        dim, ddim, p = config.embed_dim, decoder_embed_dim, config.patch_size
        grid = self.encoder.grid
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(ddim, grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(ddim, decoder_num_heads, config.mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(ddim, eps=1e-6)
        self.decoder_pred = nn.Linear(ddim, p * p * config.in_chans)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def config(self) -> ViTConfig:
        return self.encoder.config

    def spec_args(self) -> dict:
        """Constructor arguments beyond the config (:mod:`lomar.models.spec`)."""
        return dict(**self.decoder_settings, mask_ratio=self.mask_ratio, norm_pix_loss=self.norm_pix_loss)

    def _decode(self, x: torch.Tensor, ids_shuffle: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Encoded [cls] + kept tokens (R, 1+keep, D) -> predicted pixels (R, L, p·p·C) of all L tokens.

        ``ids_shuffle`` (R, L): the token order whose first ``keep`` were encoded; the others become
        mask tokens. ``pos`` (1+L, D') or (1, 1+L, D'): the decoder's position table.
        """
        x = self.decoder_embed(x)
        fill = self.mask_token.to(x.dtype).expand(x.shape[0], ids_shuffle.shape[1] + 1 - x.shape[1], -1)
        tokens = torch.cat([x[:, 1:], fill], dim=1)
        tokens = tokens.gather(1, ids_shuffle.argsort(dim=1)[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], tokens], dim=1) + pos.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> MAEOutput:
        """images (N, C, H, W) normalised, at the built size -> loss (), pred (N, L, p·p·C), mask (N, L) float, 1 where
        reconstructed (:class:`MAEOutput`). noise (N, L) uniform decides the mask (argsort, keep lowest); without it,
        drawn from ``generator``."""
        enc, p = self.encoder, self.config.patch_size
        grid = enc.image_grid(images)
        if grid != enc.grid:
            built = "x".join(str(side * p) for side in enc.grid)
            size = images.shape[-2] if images.shape[-2] == images.shape[-1] else tuple(images.shape[-2:])
            raise ValueError(f"MAE was built for {built} images, got {images.shape[-2]}x{images.shape[-1]}; resize "
                             f"them, or build it with img_size={size}")
        n, length = images.shape[0], grid[0] * grid[1]
        if n == 0:  # as LoMaR's: the loss over no masked patch is 0 / 0
            raise ValueError("MAE needs at least one image; got an empty batch")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if noise is None:
            noise = _uniform_noise(n, length, generator, images.device)
        elif not isinstance(noise, torch.Tensor) or not noise.is_floating_point():  # bool noise: the same mask always
            raise TypeError(f"noise must be a float tensor (N, L) of uniform draws, e.g. torch.rand({n}, {length}), "
                            f"got {noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__}")
        elif noise.shape != (n, length) or noise.device != images.device:
            raise ValueError(f"noise must have shape (N, L) = {(n, length)} on the images' device {images.device}, "
                             f"got {tuple(noise.shape)} on {noise.device}")
        ids_shuffle = noise.argsort(dim=1)
        ids_keep = ids_shuffle[:, :int(length * (1 - self.mask_ratio))]
        x = enc.norm(enc.forward_blocks(enc.prepare_tokens(images, token_index=ids_keep), grid))
        pred = self._decode(x, ids_shuffle, self.decoder_pos_embed)
        mask = torch.ones(n, length, device=images.device).scatter_(1, ids_keep, 0)
        target = normalize_targets(patchify(images, p).float(), self.norm_pix_loss)
        return MAEOutput(masked_mse(pred, target, mask), pred, mask)


@torch.compiler.disable  # as lomar.models.masking.sample_plan: random draws run eagerly under torch.compile
def _uniform_noise(n: int, length: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(n, length) U(0, 1) noise, drawn on the generator's device, returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, length, generator=generator, device=gen_device).to(device)
