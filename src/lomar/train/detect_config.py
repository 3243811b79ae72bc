"""The detection configuration: ViTDet's Mask R-CNN recipe as defaults, YAML + flags, checks.

Resolution order, later wins: the recipe -> the YAML file (``--config``) -> command-line flags; a
resumed run starts from its saved settings, only run-control settings may change. Everything
that can be checked is checked here, before any folder is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lomar.checkpoints.kinds import DETECT_FORMAT, find_command_checkpoint
from lomar.data.coco_values import check_coco_paths
from lomar.train import settings as S
from lomar.train.config_checks import check_eval_only_model, refuse_contradictions, refuse_training_settings
from lomar.train.encoder_settings import (
    check_img_size,
    check_pretrained,
    check_windows,
    model_only_without_pretrained,
    pretrained_encoder,
    random_encoder_patch,
    rebuilt_encoder_config,
)
from lomar.train.recorded_paths import recorded_path
from lomar.train.setting_names import setting_of
from lomar.train.settings import ConfigError, coerce_all
from lomar.train.task_config import TaskConfig

__all__ = ["DetectConfig", "default_image_folder", "DETECTOR_LAYOUT", "PREDICTIONS"]

_RUN = "run-control"
PREDICTIONS = "predictions.json"  # in --out, a COCO results file: a run's last evaluation's, or --eval-only's
# What a detector started from a `lomar detect` checkpoint takes from that run unless given: its input size,
# its encoder's attention layout (the weights fit any, the model was trained and is scored with these) and its
# relative position term (part of the weights: it must match).
DETECTOR_LAYOUT = ("img_size", "window_size", "global_blocks", "attention", "drop_path", "rel_pos")
# What --eval-only takes from the detector's run unless --val-ann is given
_SCORED_ON = ("val_ann", "val_images")
# What a checkpoint saved before these settings existed trained with: a fixed position table, no relative term
_SAVED_BEFORE = {"train_pos_embed": False, "rel_pos": "none"}
# what --eval-only leaves unread: the training split, schedule, optimizer and augmentation (stochastic depth too: a
# model in eval mode drops no path), and the precision (training's autocast: a detector is evaluated in fp32)
_TRAINING = ("train_ann", "train_images", "accum_steps", "epochs", "max_steps", "schedule_steps", "blr",
             "warmup_steps", "layer_decay", "weight_decay", "clip_grad", "drop_path", "jitter", "grad_checkpointing",
             "train_pos_embed", "rois_per_image", "eval_every", "log_every", "time_limit", "precision")


_IMAGES_DEFAULT = ("for {flag} ROOT/annotations/instances_SPLIT.json, ROOT/SPLIT or ROOT/images/SPLIT where it "
                   "exists (COCO's and compose-digits' layouts), else the file's folder")


def default_image_folder(ann: Path) -> Path:
    """Where a COCO instances file's images are when no folder is given (see ``_IMAGES_DEFAULT``): COCO's
    ``annotations/instances_val2017.json`` -> ``val2017/``, compose-digits' ``instances_val.json`` ->
    ``images/val/``."""
    split = ann.stem.removeprefix("instances_")
    if ann.parent.name == "annotations" and split != ann.stem:
        for folder in (ann.parent.parent / split, ann.parent.parent / "images" / split):
            if folder.is_dir():
                return folder
    return ann.parent


@dataclass
class DetectConfig(TaskConfig):
    COMMAND = "detect"
    TRAINS_FROM_OWN = True
    # not a setting: --pretrained's `lomar detect` checkpoint as complete read it (kinds.FoundCheckpoint; a file
    # whatever its suffix, or a run folder's best.pt / last.pt), which the task builds the detector from
    detector = None
    train_ann: str | None = S.setting(None, "COCO instances JSON of the training split (default: none; required to "
                                      "train)", kind=str, path=True, resume=_RUN, metavar="FILE")
    train_images: str | None = S.setting(None, "folder of the training images (file_name is relative to it; "
                                         f"default: {_IMAGES_DEFAULT.format(flag='--train-ann')})", kind=str,
                                         path=True, resume=_RUN, metavar="DIR")
    val_ann: str | None = S.setting(None, "COCO instances JSON of the validation split (default: none, required; with "
                                    "--eval-only the one its detector's run scored)",
                                    kind=str, path=True, resume=_RUN, metavar="FILE")
    val_images: str | None = S.setting(None, "folder of the validation images (default: "
                                       f"{_IMAGES_DEFAULT.format(flag='--val-ann')}; with --eval-only and no --val-ann "
                                       "the one its detector's run scored)", kind=str, path=True,
                                       resume=_RUN, metavar="DIR")
    pretrained: str | None = S.PRETRAINED.field(help=S.PRETRAINED.help + ", or a `lomar detect` run or checkpoint "
                                                "(default: a randomly initialised --model)")
    model: str | None = S.RANDOM_MODEL.field()
    out: str | None = S.OUT.field(help="output folder: config.yaml, last.pt, best.pt (the best-scoring box AP), "
                                  "metrics.jsonl, predictions.json (default: runs/<timestamp>)")
    img_size: int = S.IMG_SIZE.field(1024, help="fixed input size in pixels, a multiple of 32: training crops (at "
                                     "most this) and evaluation images (resized to this longest side, boxes and "
                                     "masks mapped back to the original) are padded to it")
    batch_size: int = S.BATCH_SIZE.field(2, help="images per device per step (ViTDet: 64 in all)")
    accum_steps: int = S.ACCUM_STEPS.field()
    epochs: int = S.EPOCHS.field(100)
    max_steps: int | None = S.MAX_STEPS.field()
    schedule_steps: int | None = S.SCHEDULE_STEPS.field(
        help="length of the lr schedule (warm-up, then the steps) in optimizer steps; default --epochs x the steps "
             "per epoch, except a new run given --max-steps and no --epochs: its schedule spans --max-steps")
    blr: float = S.BLR.field(4e-4, help="base lr: lr = blr x effective batch / 256 (ViTDet: 1e-4 at batch 64)")
    warmup_steps: int = S.setting(250, "optimizer steps of linear lr warm-up (from 0.001 x lr; at most the "
                                  "schedule's length); then the lr drops 10x at 88.9% and 96.3% of the schedule "
                                  "(ViTDet's steps)", low=0)
    layer_decay: float = S.LAYER_DECAY.field(0.7)
    weight_decay: float = S.WEIGHT_DECAY.field(0.1)
    clip_grad: float | None = S.CLIP_GRAD.field(help="clip the gradient norm to this (default: no clipping, as "
                                                     "ViTDet's recipe)")
    drop_path: float = S.DROP_PATH.field()
    jitter: tuple[float, float] = S.setting((0.1, 2.0), "large-scale jitter: image resized to --img-size x a random "
                                            "factor in [LOW, HIGH]", finite=False, nargs=2, metavar=("LOW", "HIGH"))
    window_size: int | None = S.setting(
        14, "ViTDet-style blocks: attend inside N x N patch windows (iRPE inside each) except in --global-blocks; "
        "0 = global attention in every block", low=0, kind=int)
    global_blocks: tuple[int, ...] | None = S.GLOBAL_BLOCKS.field()
    attention: str = S.ATTENTION.field()
    grad_checkpointing: bool = S.GRAD_CHECKPOINTING.field()
    train_pos_embed: bool = S.TRAIN_POS_EMBED.field()
    rel_pos: str = S.REL_POS.field()
    rois_per_image: int = S.setting(512, "RoIs sampled per image for the box and mask heads (ViTDet: 512; fewer "
                                    "is faster on CPU)", above=0)
    eval_every: int | None = S.EVAL_EVERY.field()
    eval_only: bool = S.setting(False, "score --pretrained (a `lomar detect` run or checkpoint) on the validation "
                                "split, write predictions.json and metrics.jsonl into --out, and stop",
                                resume="per-invocation")

    @staticmethod
    def saved_settings(checkpoint: dict, path: Path) -> dict | None:
        """The settings a `lomar detect` checkpoint saved; None for another file."""
        if checkpoint.get("format") != DETECT_FORMAT or "optimizer" not in checkpoint:
            return None
        return {**_SAVED_BEFORE, **checkpoint.get("settings", {})}

    def complete(self, explicit: dict[str, Any]) -> None:
        refuse_training_settings(self, explicit, _TRAINING)
        model_only_without_pretrained(self, explicit)
        if self.pretrained and not rebuilt_encoder_config(self):  # a resume rebuilding its model reads no --pretrained
            # one read (its tensors mapped, read as the task loads them): the layout taken here and the weights
            # loaded are of one file, even if a run still training there renames a newer best.pt over it meanwhile
            self.detector = find_command_checkpoint(self.pretrained, self.COMMAND)
        if self.detector is not None and isinstance(own := self.detector.checkpoint.get("encoder_config"), dict):
            refuse_contradictions(explicit, own, ("rel_pos",), "detector", self.detector.path,
                                  agrees=lambda name, given: given == "auto")  # the same weights either way
        # a resumed run has its own settings, those it started with; --resume auto that finds no checkpoint starts one
        if self.detector is not None and self.resume_point is None:
            settings = self.detector.checkpoint.get("settings")
            if isinstance(settings, dict):
                settings = {**_SAVED_BEFORE, **settings}
                # --eval-only scores the split its run scored unless given one, as segment's takes its run's --data
                scored = _SCORED_ON if self.eval_only and "val_ann" not in explicit else ()
                taken = {k: v for k, v in settings.items() if k in DETECTOR_LAYOUT + scored and k not in explicit
                         and (v is not None or k not in scored)}  # a split it names; none: --val-ann is asked for
                scores = f"--eval-only scores {self.detector.path} on the split its run scored"
                for name in (k for k in scored if isinstance(taken.get(k), str)):
                    taken[name] = recorded_path(taken[name], settings, self.detector.path, scores,
                                                "pass --val-ann FILE (and --val-images DIR) of the split to score")
                for name, value in coerce_all(type(self), taken, str(self.detector.path), strict=False).items():
                    setattr(self, name, value)
                if "val_ann" in taken and not Path(self.val_ann).is_file():  # not a --val-ann the user typed
                    raise ConfigError(f"{scores}, {self.val_ann}, which is not a file now; pass --val-ann FILE (and "
                                      f"--val-images DIR) of the split to score")
        for split in ("train", "val"):
            if getattr(self, f"{split}_ann") and not getattr(self, f"{split}_images"):
                setattr(self, f"{split}_images", str(default_image_folder(Path(getattr(self, f"{split}_ann")))))

    def check_settings(self) -> None:
        if random_encoder_patch(self) not in (None, 16):  # ViTDet's pyramid: strides 4-32 from the 1/16 map
            raise ConfigError(f"--model {self.model}: the feature pyramid needs patch size 16; use a *_patch16 model")
        # a detector's: built on one; --eval-only's: check_inputs refuses any other file as no detector
        if self.pretrained and self.detector is None and not self.eval_only and not rebuilt_encoder_config(self):
            _check_backbone(self.pretrained)
        check_img_size(self)
        low, high = self.jitter
        if not 0 < low <= high < 100:
            raise ConfigError(f"--jitter must be LOW HIGH with 0 < LOW <= HIGH, got {low:g} {high:g}; e.g. 0.1 2.0")
        check_windows(self)

    def check_inputs(self) -> None:
        if self.eval_only:  # first: a detector's run names the split to score
            check_eval_only_model(self, self.detector, "detector")
        if not self.val_ann:
            raise ConfigError("pass --val-ann FILE (COCO instances JSON) and --val-images DIR: the split AP is "
                              "scored on")
        if not self.eval_only and not self.train_ann:
            raise ConfigError("pass --train-ann FILE and --train-images DIR (COCO instances), or --eval-only")
        if self.eval_only and (Path(self.out) / PREDICTIONS).exists() and not self.overwrite:
            raise ConfigError(f"{setting_of(self, 'out')} already holds a {PREDICTIONS} (a run's last "
                              f"evaluation, or an earlier --eval-only); pass another --out, or --overwrite to "
                              f"replace it")
        check_pretrained(self)
        # read_coco's first checks, before torch is imported (seconds) to read the files; val first, as DetectTask reads
        for flag, ann, images in (("--val-ann", self.val_ann, self.val_images),
                                  ("--train-ann", None if self.eval_only else self.train_ann, self.train_images)):
            if ann:
                check_coco_paths(ann, images or None, flag, flag.replace("-ann", "-images"))


def _check_backbone(pretrained: str) -> None:
    """Refuse an encoder the detector cannot use, or a trained model that is no encoder (a segmenter, a linear probe),
    from its config or weight shapes, before the run reads its weights (seconds for a large file) and the COCO files
    (minutes for COCO's)."""
    kind, patch = pretrained_encoder(pretrained)
    if kind == "beit":
        raise ConfigError(f"--pretrained {pretrained}: only LoMaR / MAE ViT encoders can be detection backbones, "
                          f"not BEiT")
    if patch not in (None, 16):  # ViTDet's pyramid: strides 4-32 from the 1/16 map
        raise ConfigError(f"--pretrained {pretrained}: the feature pyramid needs patch size 16 (strides 4-32), its "
                          f"encoder's is {patch}; pass a patch-16 encoder")
