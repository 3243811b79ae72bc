"""The finetuning configuration: the original recipe's defaults (SPEC §3), YAML + flags, validation.

Resolution order, later wins: the recipe → the YAML file (``--config``) → command-line flags.
A resumed run (``--resume``) starts from its saved settings instead; only run-control
settings may change. Everything is checked before any folder is made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lomar.checkpoints.kinds import classifier_pool, find_command_checkpoint, trained_precision
from lomar.data.class_roots import not_a_class_root
from lomar.train import settings as S
from lomar.train.config_checks import (
    EVAL_DECODES,
    check_eval_only_model,
    check_min_lr,
    check_warmup,
    refuse_contradictions,
    refuse_training_settings,
)
from lomar.train.encoder_settings import check_pretrained, check_windows
from lomar.train.settings import ConfigError, coerce_all
from lomar.train.task_config import TaskConfig

__all__ = ["FinetuneConfig", "add_finetune_arguments", "resolve_finetune_config", "split_roots"]


# What --eval-only takes from the classifier it scores, its weights' layout: one given otherwise is refused. Its size
# and its run's precision and --decode (its evaluations' pixels) are taken unless given: at another --img-size its
# position table is resampled as for any image of another size.
CLASSIFIER_OWN = ("global_pool", "window_size", "global_blocks")
# what --eval-only leaves unread: the training split, schedule, optimizer and augmentation
_TRAINING = ("train", "accum_steps", "epochs", "max_steps", "schedule_steps", "blr", "min_lr", "warmup_epochs",
             "layer_decay", "weight_decay", "clip_grad", "drop_path", "grad_checkpointing", "train_pos_embed",
             "decay_rel_pos_bias", "mixup", "cutmix", "smoothing", "reprob", "aa", "crop_scale", "log_every",
             "time_limit")


@dataclass
class FinetuneConfig(TaskConfig):
    COMMAND = "finetune"
    TRAINS_FROM_OWN = True
    classifier = None  # not a setting: --eval-only's checkpoint as complete read it (kinds.FoundCheckpoint)
    precision_auto = False  # not a setting: --eval-only under --precision auto, whose precision is the classifier's own
    notes_said = None  # not a setting: a study's notes said so far (lines, a dict), which its finetunes do not repeat
    pretrained: str | None = S.PRETRAINED.field(help=S.PRETRAINED.help + " (default: none; required unless "
                                                     "resuming, which reads it from the checkpoint), or with "
                                                     "--eval-only a `lomar finetune` run or checkpoint")
    data: str | None = S.DATA.field()
    train: str | None = S.TRAIN.field()
    val: str | None = S.VAL.field()
    out: str | None = S.OUT.field(help="output folder: config.yaml, last.pt, best.pt (the best top-1), metrics.jsonl "
                                       "(default: runs/<timestamp>)")
    img_size: int = S.IMG_SIZE.field(help="image size in pixels; may differ from the pretraining size")
    batch_size: int = S.BATCH_SIZE.field(help="images per process per step (even: mixup pairs)")
    accum_steps: int = S.ACCUM_STEPS.field()
    global_pool: str = S.setting("avg", "classifier input: avg = mean of the patch tokens -> fc_norm (the recipe); "
                               "cls = the cls token after the final norm", choices=("avg", "cls"))
    epochs: int = S.EPOCHS.field(100)
    max_steps: int | None = S.MAX_STEPS.field()
    schedule_steps: int | None = S.SCHEDULE_STEPS.field()
    blr: float = S.BLR.field(5e-4, help=S.BLR.help + " (default: 5e-4; a BEiT encoder: 1e-3, BEiT's recipe)")
    min_lr: float = S.MIN_LR.field(1e-6)
    warmup_epochs: float = S.WARMUP_EPOCHS.field(5, help=S.WARMUP_EPOCHS.help + " (default: 5; a BEiT "
                                                 "encoder: 20, BEiT's recipe)")
    layer_decay: float = S.LAYER_DECAY.field()
    weight_decay: float = S.WEIGHT_DECAY.field()
    clip_grad: float | None = S.CLIP_GRAD.field(help="clip the gradient norm to this, as the original's --clip_grad "
                                                     "(default: no clipping, the recipe's)")
    drop_path: float = S.DROP_PATH.field()
    grad_checkpointing: bool = S.GRAD_CHECKPOINTING.field()
    train_pos_embed: bool = S.TRAIN_POS_EMBED.field()
    decay_rel_pos_bias: bool = S.setting(True, "BEiT's finetuning groups for a BEiT encoder: its relative position "
                                               "tables decayed, a cls-pooling model's final norm at the top layer's "
                                               "lr; --no-decay-rel-pos-bias gives timm's (tables exempt, that norm at "
                                               "the last block's lr), as runs of lomar before 2026-12-05")
    # ViTDet's attention window, not LoMaR's K (pretrain --window-size): the flag predates the split
    window_size: int | None = S.setting(
        None, "ViTDet-style blocks at high resolution: attend inside N x N patch windows (iRPE inside each) except in "
        "--global-blocks; 0 = global attention in every block (default: the pretrained encoder's layout, global for "
        "pretraining checkpoints)", low=0, kind=int)
    global_blocks: tuple[int, ...] | None = S.GLOBAL_BLOCKS.field()
    attention: str = S.ATTENTION.field()
    mixup: float = S.setting(0.8, "mixup alpha (0 = off)", low=0)
    cutmix: float = S.setting(1.0, "cutmix alpha (0 = off)", low=0)
    smoothing: float = S.setting(0.1, "label smoothing", low=0, below=1)
    reprob: float = S.setting(0.25, "random erasing probability", low=0, high=1)
    aa: str = S.setting("rand-m9-mstd0.5-inc1", "timm auto-augment policy ('none' = off)", off="none")
    crop_scale: tuple[float, float] = S.setting(  # checked as a pair in validate
        (0.08, 1.0), "area range of the training random resized crop, as fractions of the image (0 < LOW <= HIGH "
        "<= 1); raise LOW for small images, e.g. 0.5 1.0 (default: 0.08 1.0, timm's, the original recipe's)",
        finite=False, nargs=2, metavar=("LOW", "HIGH"))
    decode: str = S.DECODE.field(takes=EVAL_DECODES, help="how images are decoded: full = the whole photo "
                                 "(reference); draft = a JPEG at 1/2-1/8 scale while the training crop's sides (and "
                                 "val's resize) stay at least --img-size (same crops and augmentation, pixels within "
                                 "about a level of 255; a 12 MP photo's sample 4x faster)")
    eval_only: bool = S.setting(False, "score --pretrained (a `lomar finetune` run or checkpoint) on the validation "
                                "split (--val, or --data's val/) at its own classes and at its size unless "
                                "--img-size, append a metrics.jsonl record to --out, and stop", resume="per-invocation")

    @classmethod
    def fresh_values(cls, explicit: dict[str, Any]) -> dict[str, Any]:
        """A new run's settings; a BEiT encoder is finetuned with BEiT's recipe where it differs from MAE's."""
        values = super().fresh_values(explicit)
        _check_aa_sections(values["aa"])  # a new run's only: a resumed run keeps the policy it trained with
        if values.get("pretrained") and not values.get("eval_only") and _is_beit(values["pretrained"]):
            values.update({k: v for k, v in BEIT_FINETUNE.items() if k not in explicit})
        return values

    @staticmethod
    def saved_settings(checkpoint: dict, path: Path) -> dict | None:
        """The settings a `lomar finetune` checkpoint saved ("args": runs before FinetuneConfig saved them)."""
        if not {"optimizer", "batches_done", "best_top1"} <= set(checkpoint):
            return None
        saved = next((checkpoint[k] for k in ("settings", "args") if isinstance(checkpoint.get(k), dict)), {})
        return {"train_pos_embed": False, "decay_rel_pos_bias": False, **saved}  # as runs before these settings did

    def complete(self, explicit: dict[str, Any]) -> None:
        self._warmup_note = None
        refuse_training_settings(self, explicit, _TRAINING)
        if "warmup_epochs" not in explicit and 0 < self.epochs < self.warmup_epochs:
            # The default warm-up (the recipe's 5 epochs) in a shorter run: warm up over the whole run, saying so
            # once the settings are valid (a note before an error is noise), by one process per machine.
            self._warmup_note = (f"warming up for all {self.epochs} epoch(s) (the default {self.warmup_epochs:g} is "
                                 f"longer than --epochs)")
            self.warmup_epochs = float(self.epochs)
        if self.eval_only and self.pretrained:
            # one read (its tensors mapped, read as the task loads them): the settings taken here and the weights
            # scored are of one file, even if a run still training there renames a newer best.pt over it meanwhile
            self.classifier = find_command_checkpoint(self.pretrained, self.COMMAND)
        if self.classifier is None:
            return
        ckpt, saved = self.classifier.checkpoint, self.classifier.path
        layout = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        pool = classifier_pool(ckpt, ckpt.get("model", {}))
        run = ckpt.get("settings") if isinstance(ckpt.get("settings"), dict) else {}
        # a recorded value that is no precision is none recorded: auto then takes this machine's, as predict's does
        recorded = trained_precision(ckpt)
        own = {"global_pool": pool, "img_size": layout.get("img_size"),
               "precision": recorded if recorded in S.PRECISIONS else None,
               "decode": run.get("decode"), **{k: layout.get(k) for k in CLASSIFIER_OWN[1:]}}
        own = coerce_all(type(self), {k: v for k, v in own.items() if v is not None}, str(saved), strict=False)
        own["global_blocks"] = own.get("global_blocks") or None  # () of a global encoder: no --global-blocks
        refuse_contradictions(explicit, own, CLASSIFIER_OWN, "classifier", saved)
        auto = explicit.get("precision", "auto") == "auto"  # given or not, as a resume's (precision.run_precision)
        for name, value in own.items():
            if (name not in explicit or (name == "precision" and auto)) and value is not None:
                setattr(self, name, value)
        self.precision_auto = auto  # the precision set above, or auto where the checkpoint records none

    def notes(self) -> list[str]:
        return [self._warmup_note] if getattr(self, "_warmup_note", None) else []

    def check_settings(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:  # also false for nan; inf fails <= 1
            raise ConfigError(f"--crop-scale must be LOW HIGH with 0 < LOW <= HIGH <= 1 (finite fractions of the "
                              f"image area), got {low:g} {high:g}; e.g. --crop-scale 0.08 1.0 (the recipe) or 0.5 1.0")
        check_windows(self)
        check_warmup(self)
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2 and not self.eval_only:
            raise ConfigError(f"mixup/cutmix pair images: --batch-size must be even, got {self.batch_size}")
        check_min_lr(self)

    def check_inputs(self) -> None:
        if self.eval_only:
            self._check_eval_only()
            return
        if not (self.data or (self.train and self.val)):
            raise ConfigError("pass --data ROOT (with train/ and val/) or both --train and --val")
        layout = "finetuning needs ImageFolder class folders (ROOT/train/CLASS/IMAGE and ROOT/val/CLASS/IMAGE)"
        if self.data and not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data} is not a folder; {layout}")
        for split in split_roots(self):
            if not split.is_dir():  # a split of --data: named as what --data holds; a --train or --val: itself
                raise ConfigError(not_a_class_root(split) if self.data and split.parent == Path(self.data) else
                                  f"{split} is not a folder; {layout}")
        if self.pretrained is None:
            raise ConfigError("pass --pretrained CHECKPOINT (the encoder to finetune)")
        check_pretrained(self)
        if self.aa == "none":
            return
        from lomar.data.classify import classification_transforms  # torch, timm: not for --help

        try:  # build the policy now: a typo would otherwise surface as a cryptic error at the first image
            classification_transforms(self.img_size, self.aa, self.reprob, self.crop_scale)
        except Exception as exc:  # timm reports an unknown policy with an AssertionError / KeyError
            raise ConfigError(f"--aa {self.aa!r} is not a timm auto-augment policy ({exc}); e.g. "
                              f"rand-m9-mstd0.5-inc1, augmix-m5, original, or none") from None

    def _check_eval_only(self) -> None:
        check_eval_only_model(self, self.classifier, "classifier")
        if not (self.data or self.val):
            raise ConfigError("pass --val DIR (class folders, ROOT/CLASS/IMAGE) or --data ROOT (with val/)")
        if not (val := split_roots(self)[1]).is_dir():
            raise ConfigError(f"{val} is not a folder; --eval-only scores ImageFolder class folders (VAL/CLASS/IMAGE)")


# BEiT's finetuning of a self-supervised BEiT-base (unilm beit/get_started_for_image_classification.md): lr 4e-3
# at batch 1024, here the base lr that gives it there (scaled with the batch as every finetune lr), 20 warm-up
# epochs; layer decay 0.65, drop path 0.1, 100 epochs, mixup/cutmix and the rest are MAE's values too.
BEIT_FINETUNE = {"blr": 1e-3, "warmup_epochs": 20}


_RAND_SETS = ("tweights", "t3aw", "t3a")  # RandAugment's named op sets (its 't' sections); timm's default otherwise


def _check_aa_sections(aa: str) -> None:
    """ConfigError naming a section of ``--aa`` that timm passes over without a word: each section after the policy's
    name is KEY + number (m9, mstd0.5, inc1), split at the first digit and skipped when there is none, so
    ``rand-m9-mstd0.5-incl`` (an l for the 1) trained without inc1's increasing ops; an unknown RandAugment op set
    (``t`` section) is timm's default set."""
    name, *sections = aa.split("-")
    for section in sections:
        if name.startswith("rand") and section.startswith("t") and section not in _RAND_SETS:
            raise ConfigError(f"--aa {aa!r}: section {section!r} names no RandAugment op set "
                              f"({', '.join(_RAND_SETS)}), and timm would use its default set without a word; fix or "
                              f"drop it")
        if not (name.startswith("rand") and section.startswith("t")) and not re.search(r"\d", section):
            raise ConfigError(f"--aa {aa!r}: section {section!r} holds no number, and timm would pass over it without "
                              f"a word; each is KEY + number, e.g. rand-m9-mstd0.5-inc1")


def _is_beit(pretrained: str) -> bool:
    from lomar.checkpoints.peek import holds_beit  # torch: not for --help

    return holds_beit(pretrained)


add_finetune_arguments = FinetuneConfig.add_arguments
resolve_finetune_config = FinetuneConfig.resolve


def split_roots(config: FinetuneConfig) -> tuple[Path | None, Path]:
    """(train, val) ImageFolder roots; train None for --eval-only given --val alone."""
    train = Path(config.train) if config.train else Path(config.data) / "train" if config.data else None
    val = Path(config.val) if config.val else Path(config.data) / "val"
    return train, val
