"""A BEiT encoder as ``lomar finetune`` trains it: timm's ``Beit`` built from a :class:`~lomar.models.beit.BEiTConfig`.

The class is timm's model, keys and forward, with the model spec (:mod:`lomar.models.spec`) that rebuilds it: its
config is the BEiTConfig of the pretraining model the encoder came from (at the size and drop path it was finetuned
with), its args the head (``num_classes``, and timm's ``global_pool``: ``'avg'``, the mean of the un-normed patch tokens
into ``fc_norm``, the original BEiT finetuning; ``'token'``, the normed cls token). The relative position bias is per
block, as BEiT's finetuning initialises it from the shared pretraining table.
"""

from __future__ import annotations

from timm.models.beit import Beit

from lomar.models.beit import BEiTConfig, timm_beit_args

__all__ = ["BEiTClassifier"]


class BEiTClassifier(Beit):
    """timm ``Beit(**timm_beit_args(config), num_classes, global_pool, drop_path_rate=config.drop_path_rate)``, which
    keeps its ``config``. ``forward``: (B, C, H, W) images, ImageNet-normalised, at ``config.img_size`` -> (B,
    num_classes) logits (without a head, (B, D) pooled features)."""

    def __init__(self, config: BEiTConfig, num_classes: int = 0, global_pool: str = "token"):
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool={global_pool!r}: timm's Beit pools by 'avg' or 'token'")
        super().__init__(**{**timm_beit_args(config), "num_classes": num_classes, "global_pool": global_pool,
                            "drop_path_rate": config.drop_path_rate})
        self.config = config

    def spec_args(self) -> dict:
        return {"num_classes": self.num_classes, "global_pool": self.global_pool}
