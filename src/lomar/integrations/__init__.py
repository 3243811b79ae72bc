"""lomar encoders inside other libraries: timm's model registry (:mod:`.timm`), the backbones of detection /
segmentation frameworks (:mod:`.dense`), and what ``lomar detect`` and ``lomar segment`` build on an encoder:
torchvision's Mask R-CNN (:mod:`.detection`) and mmsegmentation's UperNet, rebuilt here from
:mod:`lomar.models.upernet` (:mod:`.segmenter`). Documented import paths: ``lomar.timm_models`` and ``lomar.dense``."""
