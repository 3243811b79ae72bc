"""BEiT pretraining on a masking plan: global (one window = the whole grid) or K×K windows (Table 5).

The visual tokenizer labels the second view of the same crop (the ImageNet-normalised model view,
de-normalised and resized to ``grid × tokenizer stride`` px, e.g. 224 → 112 for 8 px tokenizer
patches), on the images' device, without gradients. It is held outside the module tree: it is
not trained, not in the optimizer and not in ``state_dict()``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lomar.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lomar.models.beit import BEiT, BEiTConfig, check_token_ids
from lomar.models.blockmask import window_blockmask_args
from lomar.models.masking import MaskingPlan, num_masked, window_token_index
from lomar.models.objective import gather_patches
from lomar.models.windows import sample_method_plan, window_geometry

__all__ = ["BEiTPretrain", "BEiTPretrainOutput", "tokenizer_view"]

class BEiTPretrainOutput(NamedTuple):
    """The step's loss and its per-window predictions at a fixed number S of slots per window.

    Slot s of a window holds its s-th masked token (raster order) while ``slot_mask`` is True; the
    rest are padding. Fixed shapes keep the compiled step whole (no ``nonzero``); ``logits`` and
    ``targets`` select the masked tokens (run them outside a compiled region).
    """

    loss: torch.Tensor  # () cross-entropy over every masked token of every window
    slot_logits: torch.Tensor  # (R, S, V) R = N·n windows, image-major
    slot_targets: torch.Tensor  # (R, S) the tokenizer's ids at those tokens
    slot_mask: torch.Tensor  # (R, S) bool, True = a masked token, False = padding
    plan: MaskingPlan

    @property
    def logits(self) -> torch.Tensor:
        """(M, V) masked tokens, (image, window)-major, raster order inside a window."""
        return self.slot_logits[self.slot_mask]

    @property
    def targets(self) -> torch.Tensor:
        """(M,) the tokenizer's ids at those tokens."""
        return self.slot_targets[self.slot_mask]

    @property
    def accuracy(self) -> torch.Tensor:
        """() the share of masked tokens whose most likely id is the tokenizer's, BEiT's logged
        ``mlm_acc`` (BEIT_SPEC §1.8); fixed shapes, no host sync."""
        hits = (self.slot_logits.argmax(-1) == self.slot_targets) & self.slot_mask
        return hits.sum() / self.slot_mask.sum().clamp_min(1)


def tokenizer_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """ImageNet-normalised (N, 3, H, W) → the same crop in [0, 1] at ``size`` px (bicubic, antialiased)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = images.float() * std + mean
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1)


class BEiTPretrain(nn.Module):
    """BEiT + tokenizer + masking settings.

    Args:
        config: the BEiT architecture; ``vocab_size`` must equal the tokenizer's.
        tokenizer: images in [0, 1] → one token per patch (:class:`lomar.tokenizers.Tokenizer`);
            its grid must be the model's patch grid.
        window_size, num_windows: K×K windows per image; ``num_windows=0`` = the whole grid.
        mask_ratio: random in-window masking at this ratio; None = BEiT's blockwise masks scaled
            to the window (the original 75/196 on the whole 14×14 grid).
    """

    def __init__(self, config: BEiTConfig, tokenizer, window_size: int = 7, num_windows: int = 0,
                 mask_ratio: float | None = None):
        super().__init__()
        if tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"tokenizer vocabulary {tokenizer.vocab_size} != BEiT vocab_size {config.vocab_size}; "
                             f"build BEiT with vocab_size={tokenizer.vocab_size}")
        if tuple(tokenizer.grid) != config.grid:
            raise ValueError(f"tokenizer grid {tokenizer.grid} (input {tokenizer.input_size} px, stride "
                             f"{tokenizer.stride}) != the model's patch grid {config.grid}; set its input size to "
                             f"{config.grid[0] * tokenizer.stride} px")
        self.beit = BEiT(config)
        self.window_size, self.num_windows = window_geometry(config.grid, window_size, num_windows)
        self.windows_setting = num_windows
        self.mask_ratio = mask_ratio
        object.__setattr__(self, "tokenizer", tokenizer.eval().requires_grad_(False))  # not a submodule
        sample_method_plan(1, config.grid, window_size, num_windows, mask_ratio)  # fail now, not at step 1
        k = self.window_size
        # The most tokens the model's own masking hides in a window: the compiled step's slot count.
        self.mask_slots = (num_masked(k, mask_ratio) if mask_ratio is not None
                           else window_blockmask_args(k)["num_masking_patches"])

    @property
    def config(self) -> BEiTConfig:
        return self.beit.config

    @property
    def encoder(self) -> BEiT:
        return self.beit

    def spec_target(self) -> tuple[BEiT, str]:
        """What a checkpoint can rebuild (the tokenizer is not saved): the BEiT under ``beit.``."""
        return self.beit, "beit."

    def no_weight_decay(self) -> set[str]:
        """As the original BEiT: cls_token and pos_embed are not decayed (mask_token and bias tables are)."""
        return {f"beit.{name}" for name in self.beit.no_weight_decay()}

    def sample_plan(self, images: torch.Tensor, generator: torch.Generator | None = None) -> MaskingPlan:
        plan = sample_method_plan(images.shape[0], self.config.grid, self.window_size,
                                  self.windows_setting, self.mask_ratio, generator)
        return plan.to(images.device)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images (N, 3, H, W) → target ids (N, Gh·Gw), fp32 whatever the autocast."""
        tok = self.tokenizer.to(images.device)  # a no-op once there; .to() of the model does not reach it
        with torch.autocast(images.device.type, enabled=False):
            return tok.tokens(tokenizer_view(images, tok.input_size))

    def forward(self, images: torch.Tensor, plan: MaskingPlan | None = None,
                generator: torch.Generator | None = None, input_ids: torch.Tensor | None = None
                ) -> BEiTPretrainOutput:
        """images (N, 3, H, W) normalised; plan with K×K windows; input_ids (N, L) overrides the tokenizer."""
        beit, p = self.beit, self.config.patch_size
        grid = self.config.grid
        beit._check_inputs(images, None)
        if input_ids is not None:
            check_token_ids(input_ids)
            if tuple(input_ids.flatten(1).shape) != (images.shape[0], grid[0] * grid[1]):
                # the windows' token positions would index a narrower row past its end
                raise ValueError(f"input_ids must be (N, L) = {(images.shape[0], grid[0] * grid[1])} (or (N, "
                                 f"{grid[0]}, {grid[1]})), one id per patch, got {tuple(input_ids.shape)}")
        plan = (self.sample_plan(images, generator) if plan is None
                else MaskingPlan.for_batch(plan, images, self.window_size, grid))
        ids = self.tokens(images) if input_ids is None else input_ids.flatten(1).to(images.device, torch.long)
        image_index, top_left, mask = plan.flat()
        k = plan.window_size
        slots, slot_mask = self._mask_slots(plan, mask)
        token_index = window_token_index(top_left, k, grid[1])  # (R, K²)
        pixels = gather_patches(images, p, image_index, token_index).flatten(2)  # (R, K², C·p·p)
        x = beit.prepare_tokens(beit.patch_embed.embed_patches(pixels), mask, token_index)
        x = beit.norm(beit.run_blocks(x, (k, k)))[:, 1:]
        x = x.gather(1, slots[..., None].expand(-1, -1, x.shape[-1]))  # (R, S, D)
        logits = beit.lm_head(x)
        targets = ids[image_index[:, None], token_index.gather(1, slots)]
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        weight = slot_mask.flatten().to(losses.dtype)
        loss = (losses * weight).sum() / weight.sum()  # the mean over masked tokens, as BEiT
        return BEiTPretrainOutput(loss, logits, targets, slot_mask, plan.as_output())

    def _mask_slots(self, plan: MaskingPlan, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """plan.flat()'s mask (R, K²) -> the window positions of S slots (R, S) and which slots are masked (R, S).

        S is :attr:`mask_slots` (static: the compiled step has fixed shapes); eagerly it grows to
        the largest count of a hand-made plan (:meth:`MaskingPlan.masked_counts`: counted on the host
        when the training loop checked the plan). Compiled, a plan masking more is an error, not a drop.
        """
        if torch.compiler.is_compiling():
            slots = self.mask_slots
            torch._assert_async((mask.sum(1) <= slots).all(), "a window of the plan masks more tokens than the "
                                "model's masking can (BEiTPretrain.mask_slots); run such plans uncompiled")
        else:
            slots = min(mask.shape[1], max(self.mask_slots, plan.masked_counts()[1]))
        # Masked positions first, each group in raster order (stable sort of the negated 0/1 mask).
        order = (~mask).to(torch.uint8).argsort(dim=1, stable=True)[:, :slots]
        return order, mask.gather(1, order)
