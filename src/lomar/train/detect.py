"""``lomar detect`` as a Task of the shared run lifecycle: Mask R-CNN on a LoMaR encoder, COCO data, COCO AP.

The task builds the model (:func:`lomar.integrations.detection.build_mask_rcnn`), the loaders
(:mod:`lomar.data.coco`, large-scale jitter), the loss (the sum of Mask R-CNN's five losses),
ViTDet's step lr schedule and the evaluation (:func:`lomar.eval.coco.coco_metrics`); the run
itself (folder, optimizer, checkpoints, signals) belongs to the lifecycle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from lomar.checkpoints.io import atomic_write_text, safe_load
from lomar.data.coco import (
    collate_detection,
    detection_dataset,
    eval_transforms,
    read_coco,
    train_transforms,
    training_split,
)
from lomar.data.samplers import EpochSampler
from lomar.errors import UsageError
from lomar.eval.coco import coco_metrics, to_coco_results
from lomar.integrations.detection import build_mask_rcnn, detector_param_groups
from lomar.models.attention import vitdet_global_blocks
from lomar.models.vit import VisionTransformer, ViTConfig, model_config
from lomar.train.detect_config import DetectConfig

__all__ = ["DetectTask", "CHECKPOINT_FORMAT", "detect_checkpoint", "step_lr_factor"]

CHECKPOINT_FORMAT = "lomar-detect-1"


def step_lr_factor(step: int, total: int, warmup: int) -> float:
    """ViTDet's schedule as a factor of the peak lr: linear warm-up from 0.001 over ``warmup``
    steps, then x0.1 at 88.9% and x0.01 at 96.3% of ``total`` steps."""
    factor = 0.1 ** sum(step >= round(total * f) for f in (0.889, 0.963))
    if step < warmup:
        factor *= 0.001 + (1 - 0.001) * step / warmup
    return factor


def detect_checkpoint(path: str | Path) -> Path | None:
    """The `lomar detect` checkpoint ``path`` names (a file, or a run folder's best.pt / last.pt); None if not one."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "best.pt", path / "last.pt"]
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix == ".pt":
            try:
                if safe_load(candidate, mmap=True).get("format") == CHECKPOINT_FORMAT:
                    return candidate
            except (OSError, ValueError, RuntimeError):
                continue
    return None


def _layout(config: DetectConfig, depth: int | None) -> dict:
    """Encoder settings the detector overrides; ``depth`` None leaves ViTDet's global blocks to the loader."""
    layout = {"window_size": config.window_size, "drop_path": config.drop_path, "img_size": config.img_size}
    if config.attention != "auto":
        layout["attention"] = config.attention
    blocks = config.global_blocks
    if not config.window_size:
        layout["global_blocks"] = ()
    elif blocks is not None or depth is not None:
        layout["global_blocks"] = tuple(blocks if blocks is not None else vitdet_global_blocks(depth))
    else:
        layout["global_blocks"] = None
    return layout


class DetectTask:
    """Mask R-CNN training and COCO evaluation (the Task interface of ``lomar.train.lifecycle``)."""

    name = "detect"
    best_metric = "box_AP"

    def __init__(self, config: DetectConfig, device: torch.device, rank: int = 0, world_size: int = 1,
                 log=print):
        self.config, self.device, self.log = config, device, log
        self.val = read_coco(config.val_ann, config.val_images, "--val-ann", "--val-images")
        log(f"lomar detect: val {self.val.path}: {self.val.summary.line()}")
        self.categories = self.val.categories
        saved = detect_checkpoint(config.pretrained) if config.pretrained else None
        self.model = self._build_model(saved)
        self.model.to(device)
        self.train_loader = None
        if not config.eval_only:
            train = training_split(read_coco(config.train_ann, config.train_images, "--train-ann", "--train-images"))
            log(f"lomar detect: train {train.path}: {train.summary.line()}")
            if train.categories != self.categories:
                raise UsageError(f"{train.path} and {self.val.path} list different category ids "
                                 f"({train.categories} vs {self.categories}); both splits need the same categories")
            dataset = detection_dataset(train, train_transforms(config.img_size, config.jitter), train=True)
            sampler = EpochSampler(len(dataset), config.seed, rank, world_size, keys=False)
            self.train_loader = DataLoader(dataset, config.batch_size, sampler=sampler, drop_last=True,
                                           collate_fn=collate_detection, num_workers=config.workers,
                                           generator=torch.Generator().manual_seed(config.seed + rank))
            if len(self.train_loader) < config.accum_steps:
                raise UsageError(f"{train.path}: {len(dataset)} training image(s) cannot fill one step of "
                                 f"{config.accum_steps} batch(es) of {config.batch_size}; lower --batch-size")
        val_set = detection_dataset(self.val, eval_transforms(), train=False)
        self.val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world_size)), config.batch_size,
                                     collate_fn=collate_detection, num_workers=config.workers)
        self.predictions: list[dict] = []

    def _build_model(self, saved: Path | None):
        cfg = self.config
        if saved is not None:
            ckpt = safe_load(saved)
            if ckpt["categories"] != self.categories:
                raise UsageError(f"{saved} was trained on category ids {ckpt['categories']}, {self.val.path} lists "
                                 f"{self.categories}; evaluate on the split it was trained for")
            encoder = VisionTransformer(ViTConfig.from_dict(ckpt["encoder_config"]))
            model = build_mask_rcnn(encoder, len(self.categories), cfg.img_size)
            model.load_state_dict(ckpt["model"])
            self.log(f"lomar detect: detector loaded from {saved} (step {ckpt.get('step', '?')})")
            return model
        if cfg.eval_only:
            raise UsageError(f"--pretrained {cfg.pretrained} is not a `lomar detect` run or checkpoint; --eval-only "
                             f"scores a trained detector")
        if cfg.pretrained:
            from lomar.eval.features import load_pretrained_encoder

            try:
                encoder = load_pretrained_encoder(cfg.pretrained, **_layout(cfg, None))
            except ValueError as exc:
                raise UsageError(f"--pretrained {cfg.pretrained}: {exc}") from None
            if not isinstance(encoder, VisionTransformer):
                raise UsageError(f"--pretrained {cfg.pretrained}: only LoMaR / MAE ViT encoders can be detection "
                                 f"backbones, not {type(encoder).__name__}")
            self.log(f"lomar detect: {encoder.load_report.summary()}")
        else:
            config = model_config(cfg.model)
            encoder = VisionTransformer(model_config(cfg.model, **_layout(cfg, config.depth)))
            self.log(f"lomar detect: no --pretrained: {cfg.model} randomly initialised")
        if cfg.grad_checkpointing:
            encoder.set_grad_checkpointing(True)
        model = build_mask_rcnn(encoder, len(self.categories), cfg.img_size)
        model.roi_heads.fg_bg_sampler.batch_size_per_image = cfg.rois_per_image
        return model

    # ---- the Task interface ----------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return detector_param_groups(self.model, self.config.weight_decay, self.config.layer_decay)

    def lr_factor(self, step: int, total: int) -> float:
        return step_lr_factor(step, total, self.config.warmup_steps)

    def loss(self, batch) -> torch.Tensor:
        """Sum of the RPN, box and mask losses of one batch (images, targets); ``model`` in train mode."""
        images, targets = batch
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        self.last_losses = self.model(images, targets)
        return sum(self.last_losses.values())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """box_* and mask_* COCO AP in percent over the validation split; keeps the predictions."""
        was_training = self.model.training
        self.model.eval()
        results = []
        for images, targets in self.val_loader:
            outputs = self.model([image.to(self.device) for image in images])
            for output, target in zip(outputs, targets):
                results.extend(to_coco_results(output, int(target["image_id"]), self.categories))
        self.model.train(was_training)
        self.predictions = results
        return coco_metrics(self.val.coco(), results)

    def state(self) -> dict:
        return {"categories": self.categories, "encoder_config": self.model.backbone.encoder.config.to_dict(),
                "format": CHECKPOINT_FORMAT}

    def load(self, state: dict) -> None:
        if state.get("categories") != self.categories:
            raise UsageError(f"the checkpoint's category ids {state.get('categories')} differ from "
                             f"{self.val.path}'s {self.categories}")

    def finish(self, out: Path) -> None:
        """``OUT/predictions.json``: the last evaluation's detections, a COCO results file."""
        atomic_write_text(Path(out) / "predictions.json", json.dumps(self.predictions))


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
