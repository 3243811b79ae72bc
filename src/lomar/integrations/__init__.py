"""lomar encoders inside other libraries and training recipes: timm's model registry (:mod:`.timm`), the dense
backbones read from a checkpoint or export (:mod:`.dense`), and the layer-decay parameter groups ``lomar detect``
(:mod:`.detection`) and ``lomar segment`` (:mod:`.segmenter`) train with; the models themselves are
:mod:`lomar.models`'s (:mod:`~lomar.models.backbones`, :mod:`~lomar.models.mask_rcnn`, :mod:`~lomar.models.segmenter`).
Documented import paths: ``lomar.timm_models`` and ``lomar.dense``."""
