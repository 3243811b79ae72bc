"""Baseline models beside LoMaR and MAE: BEiT (masked image modeling) and its block masking."""

from .beit import BEiT, BEiTConfig, BEiTOutput
from .beit_convert import beit_from_original, beit_to_timm, load_original_beit, per_block_from_shared
from .blockmask import BlockMaskGenerator, block_mask_batch, window_blockmask_args

__all__ = ["BEiT", "BEiTConfig", "BEiTOutput", "beit_from_original", "beit_to_timm", "load_original_beit",
           "per_block_from_shared",
           "BlockMaskGenerator", "block_mask_batch", "window_blockmask_args"]
