"""lomar encoders inside other libraries: timm's model registry (:mod:`.timm`) and the backbones of
detection / segmentation frameworks (:mod:`.dense`). Documented import paths: ``lomar.timm_models``
and ``lomar.dense``."""
