"""Plain nn.Modules: the ViT and its position encodings, masking plans, the objectives, the pretraining models
(LoMaR, MAE, BEiT; :mod:`lomar.methods` puts them to work) and the dense ones on a ViT encoder: its backbones
(:mod:`.backbones`), Mask R-CNN (:mod:`.mask_rcnn`) and UperNet (:mod:`.segmenter`, its heads :mod:`.upernet`).

Each is imported from the module it lives in (``from lomar.models.lomar import LoMaR``): the package imports nothing,
so that its torch-free modules (``vit_config``, ``attention_sizes``) cost no torch import."""
