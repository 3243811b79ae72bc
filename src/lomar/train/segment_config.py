"""``lomar segment`` settings: mmsegmentation's MAE / BEiT ADE20K UperNet recipe as the defaults
(AdamW lr 1e-4, weight decay 0.05, layer decay 0.65, 1500 warm-up iterations, poly decay, 512
crops, batch 16, 160k iterations, sliding-window evaluation with stride 341 as BEiT's config;
mmseg 1.x's MAE config uses 256), YAML + flags, and the checks made before any work. Resolution as
in ``lomar finetune``: recipe → YAML → flags, or a resumed run's saved settings with only run-control
ones changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lomar.checkpoints.kinds import SEGMENT_TASK, find_command_checkpoint
from lomar.train import settings as S
from lomar.train.config_checks import check_eval_only_model, refuse_contradictions, refuse_training_settings
from lomar.train.encoder_settings import (
    check_img_size,
    check_pretrained,
    model_only_without_pretrained,
    pretrained_encoder,
    rebuilt_encoder_config,
)
from lomar.train.recorded_paths import recorded_path
from lomar.train.setting_names import setting_of, source_of
from lomar.train.settings import ConfigError, coerce_all
from lomar.train.task_config import TaskConfig

__all__ = ["SegmentConfig", "SEGMENTER_OWN"]

# What --eval-only takes from the segmenter it scores: the classes and what the annotations' 0 is (other ones would
# score other classes) and the weights' layout (they fit no other); one given otherwise is refused. Its input size and
# how the run evaluated (its data, mode and stride) are taken too, unless given: at another --img-size its position
# tables are resampled to that grid as for any image of another size, and the run's stride, of its own windows, is
# not taken.
SEGMENTER_OWN = ("num_classes", "zero_label", "head_channels", "aux_weight", "rel_pos", "train_pos_embed")
_EVALUATED = ("img_size", "data", "eval_mode", "eval_stride")
# what --eval-only leaves unread: the schedule, optimizer and augmentation, and the precision (training's autocast:
# a segmenter is evaluated in fp32)
_TRAINING = ("accum_steps", "epochs", "max_steps", "schedule_steps", "lr", "min_lr", "warmup_steps", "poly_power",
             "layer_decay", "weight_decay", "clip_grad", "drop_path", "photometric", "grad_checkpointing",
             "eval_every", "log_every", "time_limit", "precision")
ENCODER_KEYS = "backbone.encoder."  # the prefix of the encoder's weights in a segmenter's state


@dataclass
class SegmentConfig(TaskConfig):
    COMMAND = "segment"
    # not a setting: --eval-only's checkpoint as complete read it (kinds.FoundCheckpoint), which the task loads
    segmenter = None
    data: str | None = S.DATA.field(help="ADE20K-layout root: images/{training,validation}/*.jpg and "
                                         "annotations/{training,validation}/*.png of class ids, 255 ignored, 0 as "
                                         "--zero-label says (default: none; required)")
    num_classes: int | None = S.setting(None, "classes, the annotations' ids 1..N (0..N-1 with --zero-label class) "
                                        "(default: none; required; 150 for ADE20K; at most 254: predictions are "
                                        "8-bit PNGs)", kind=int, above=0, high=254)
    zero_label: str = S.setting("ignore", "what an annotation's 0 is: ignore = unlabelled, ids 1..N the classes "
                                          "(ADE20K's, mmseg's reduce_zero_label), predictions saved as class + 1; "
                                          "class = the first class, ids 0..N-1 (VOC-style, binary masks with "
                                          "--num-classes 2), predictions saved as the class id",
                                choices=("ignore", "class"))
    pretrained: str | None = S.PRETRAINED.field(help=S.PRETRAINED.help + ", or with --eval-only a `lomar segment` "
                                                "run or checkpoint (default: none: a randomly initialised --model "
                                                "encoder, said in the log)")
    model: str | None = S.RANDOM_MODEL.field()
    out: str | None = S.OUT.field(help="output folder: config.yaml, last.pt, best.pt (the best-scoring mIoU), "
                                       "metrics.jsonl, predictions/, per_class.md (default: runs/<timestamp>)")
    img_size: int = S.IMG_SIZE.field(512, help="training crop and evaluation scale (short side) in pixels, a "
                                               "multiple of twice the encoder's patch size (32 for patch 16)")
    batch_size: int = S.BATCH_SIZE.field(16, help="crops per process per step (training; an evaluation scores one "
                                                  "image at a time)")
    accum_steps: int = S.ACCUM_STEPS.field()
    epochs: int = S.EPOCHS.field(127, help="passes over the training data (127 at batch 16 on ADE20K's 20,210 "
                                           "images: mmseg's 160k iterations)")
    max_steps: int | None = S.MAX_STEPS.field()
    schedule_steps: int | None = S.SCHEDULE_STEPS.field(
        help="length of the lr schedule (warm-up + poly) in optimizer steps; default --epochs x the steps per epoch, "
             "except a new run given --max-steps and no --epochs: its schedule spans --max-steps")
    lr: float = S.LR.field(1e-4, help="AdamW peak lr of the heads; encoder layers get it x --layer-decay per "
                                      "layer below the top")
    min_lr: float = S.MIN_LR.field(0.0, help="lr at the end of the poly schedule")
    warmup_steps: int = S.setting(1500, "linear lr warm-up in optimizer steps (at most the run's length)", low=0)
    poly_power: float = S.setting(1.0, "exponent of the poly decay after the warm-up", above=0)
    layer_decay: float = S.LAYER_DECAY.field()
    weight_decay: float = S.WEIGHT_DECAY.field()
    clip_grad: float | None = S.CLIP_GRAD.field(help="clip the gradient norm to this (default: no clipping, as "
                                                     "mmseg's UperNet recipe)")
    drop_path: float = S.DROP_PATH.field()
    photometric: bool = S.setting(True, "mmseg's PhotoMetricDistortion on each training crop (brightness, contrast, "
                                        "saturation, hue)")
    head_channels: int = S.setting(768, "UperNet head width (mmseg's ViT-B recipe: 768)", above=0)
    aux_weight: float = S.setting(0.4, "loss weight of the auxiliary FCN head on the stride-16 map (0 = no "
                                       "auxiliary head)", low=0)
    eval_mode: str = S.setting("slide", "evaluation: slide = --img-size windows every --eval-stride pixels "
                                        "(mmseg's), whole = the whole image at once", choices=("slide", "whole"),
                               resume="run-control")
    eval_stride: int | None = S.setting(None, "sliding-window stride in pixels (default: 2/3 of --img-size, 341 "
                                              "for 512, as BEiT's config; mmseg 1.x's MAE config uses 256)", kind=int,
                                        above=0, resume="run-control")
    eval_every: int | None = S.EVAL_EVERY.field()
    grad_checkpointing: bool = S.GRAD_CHECKPOINTING.field()
    train_pos_embed: bool = S.TRAIN_POS_EMBED.field()
    rel_pos: str = S.REL_POS.field()
    eval_only: bool = S.setting(False, "score --pretrained (a `lomar segment` run or checkpoint) on the validation "
                                "split at its own classes and at its size unless --img-size, write predictions/, "
                                "per_class.md and a metrics.jsonl record into --out, and stop", resume="per-invocation")

    @staticmethod
    def saved_settings(checkpoint: dict, path: Path) -> dict | None:
        """The settings a `lomar segment` checkpoint saved; None for another file."""
        settings = checkpoint.get("settings") if checkpoint.get("task") == SEGMENT_TASK else None
        # runs saved before these settings existed trained without the distortion, with a fixed position table and
        # no relative position term
        legacy = {"photometric": False, "train_pos_embed": False, "rel_pos": "none", "zero_label": "ignore"}
        return {**legacy, **settings} if isinstance(settings, dict) else settings

    def complete(self, explicit: dict) -> None:
        refuse_training_settings(self, explicit, _TRAINING)
        model_only_without_pretrained(self, explicit)
        if self.eval_only and self.pretrained:
            # one read (its tensors mapped, read as the task loads them): the settings taken here and the weights
            # scored are of one file, even if a run still training there renames a newer best.pt over it meanwhile
            self.segmenter = find_command_checkpoint(self.pretrained, self.COMMAND)
        if self.segmenter is not None:
            saved = self.segmenter.path
            own = self.saved_settings(self.segmenter.checkpoint, saved) or {}
            refuse_contradictions(explicit, own, SEGMENTER_OWN, "segmenter", saved,
                                  agrees=lambda name, given: name == "rel_pos" and given == "auto")
            taken = {k: v for k, v in own.items() if k in SEGMENTER_OWN + _EVALUATED and k not in explicit}
            if explicit.get("img_size", own.get("img_size")) != own.get("img_size"):
                taken.pop("eval_stride", None)
            scores = f"--eval-only scores {saved} on the data its run scored"
            if isinstance(taken.get("data"), str):
                taken["data"] = recorded_path(taken["data"], own, saved, scores, "pass --data ROOT of the dataset to "
                                              "score")
            for name, value in coerce_all(type(self), taken, str(saved), strict=False).items():
                setattr(self, name, value)
            if "data" in taken and self.data is not None and not Path(self.data).is_dir():  # not a --data typed
                raise ConfigError(f"{scores}, {self.data}, which is not a folder now; pass --data ROOT of the dataset "
                                  f"to score")
        # a flag only: a run's config.yaml records its stride, which a whole-image scoring of the run leaves
        if explicit.get("eval_stride") is not None and source_of(self, "eval_stride") is None \
                and self.eval_mode == "whole":
            raise ConfigError(f"--eval-stride {self.eval_stride} moves --eval-mode slide's windows, but this "
                              f"evaluation is --eval-mode whole; drop it, or use --eval-mode slide")

    def check_settings(self) -> None:
        if self.segmenter is not None:  # --eval-only: its patch is its weights'
            check_img_size(self, segmenter_patch(self.segmenter.checkpoint))
        elif not self.eval_only:  # a resume rebuilding its model reads no --pretrained: its encoder's patch
            rebuilt = rebuilt_encoder_config(self)
            # a --pretrained encoder's patch, told before its weights or the data are read
            patch = (rebuilt["patch_size"] if rebuilt else pretrained_encoder(self.pretrained)[1] if self.pretrained
                     else None)
            check_img_size(self, patch)
        # --eval-only trains nothing: its BatchNorm keeps the segmenter's statistics, each image scored on its own
        if not self.eval_only and (int(os.environ.get("WORLD_SIZE", "1") or 1) < 2 or self.device == "cpu"):
            check_batch_norm_batch(self.batch_size)  # else the task checks, on CPU
        if self.eval_stride is not None and self.eval_stride > self.img_size:  # mmseg asserts the same
            raise ConfigError(f"--eval-stride {self.eval_stride} is larger than the --img-size {self.img_size} windows "
                              f"it moves: pixels between them would go unscored; use at most {self.img_size}")

    def check_inputs(self) -> None:
        if self.eval_only:
            check_eval_only_model(self, self.segmenter, "segmenter")
            if (Path(self.out) / "predictions").exists() and not self.overwrite:
                raise ConfigError(f"{setting_of(self, 'out')} already holds predictions/ (a run's last "
                                  f"evaluation, or an earlier --eval-only); pass another --out, or --overwrite "
                                  f"to replace it")
        if self.data is None:
            raise ConfigError("pass --data ROOT (ADE20K layout: images/{training,validation}, "
                              "annotations/{training,validation})")
        if not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data} is not a folder; pass the root of an ADE20K-layout dataset")
        if self.num_classes is None:
            raise ConfigError("pass --num-classes N (the annotations' class ids are 1..N, or 0..N-1 with --zero-label "
                              "class; 150 for ADE20K)")
        check_pretrained(self, "; pass a checkpoint or an exported folder, or leave it out for a random encoder")


def segmenter_patch(checkpoint: dict) -> int | None:
    """The patch size of a `lomar segment` checkpoint's encoder, its patch embedding's kernel (None without one)."""
    weight = (checkpoint.get("model") or {}).get(f"{ENCODER_KEYS}patch_embed.proj.weight")
    return None if weight is None else int(weight.shape[-1])


def check_batch_norm_batch(batch_size: int) -> None:
    """UperNet's BatchNorm on the pooled 1x1 map of one crop has one value per channel: no batch statistics."""
    if batch_size < 2:
        raise ConfigError(f"--batch-size {batch_size}: UperNet's BatchNorm needs at least 2 crops per process "
                          f"(SyncBatchNorm pools them across processes on CUDA only); use --batch-size 2 or more")
