"""``lomar segment`` as a Task of the shared run lifecycle: UperNet on a ViT encoder, ADE20K-layout
data, mmseg's recipe, mIoU / mAcc / aAcc and the last evaluation's predictions as PNGs.

:class:`SegmentTask` follows the lifecycle's Task interface (model, train_loader, best_metric,
param_groups, loss, evaluate, state, load, finish, and its own lr ``schedule``: linear warm-up
then poly). Until the shared lifecycle is merged, :mod:`lomar.train.segment_run` drives it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lomar.data.samplers import EpochSampler
from lomar.data.segmentation import SegmentationFolder
from lomar.eval.segmentation import confusion_matrix, predict_logits, segmentation_metrics
from lomar.integrations.segmenter import UperNetSegmenter, layer_decay_groups
from lomar.train.segment_config import SegmentConfig

__all__ = ["SegmentTask", "build_encoder", "poly_schedule"]

log = logging.getLogger("lomar.segment")


def build_encoder(config: SegmentConfig):
    """(encoder, one line saying where its weights come from): ``--pretrained`` through
    :func:`lomar.eval.features.load_pretrained_encoder` (anything ``lomar export`` reads), else a
    randomly initialised ``--model``."""
    if config.pretrained is None:
        from lomar.models.vit import VisionTransformer, model_config

        encoder = VisionTransformer(model_config(config.model, img_size=config.img_size, drop_path=config.drop_path))
        return encoder, f"random init {config.model} (no --pretrained)"
    from lomar.eval.features import load_pretrained_encoder

    encoder = load_pretrained_encoder(config.pretrained, img_size=config.img_size, drop_path=config.drop_path)
    return encoder, f"pretrained: {encoder.load_report.summary()}"


def poly_schedule(step: int, total: int, warmup: int, power: float = 1.0, floor: float = 0.0) -> float:
    """lr factor of optimizer step ``step`` (0-based) of ``total``: linear warm-up over ``warmup``
    steps (from 1e-6 of the peak, mmseg's LinearLR start), then (1 - t)^power down to ``floor``."""
    if step < warmup:
        return 1e-6 + (1 - 1e-6) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * (1 - t) ** power


class SegmentTask:
    name = "segment"
    best_metric = "mIoU"

    def __init__(self, config: SegmentConfig, device: torch.device, rank: int = 0, world_size: int = 1):
        self.config, self.device, self.rank = config, torch.device(device), rank
        workers = config.workers or 0
        self.train_set = SegmentationFolder(config.data, "training", config.num_classes, config.img_size,
                                            train=True, seed=config.seed, workers=max(1, workers))
        self.val_set = SegmentationFolder(config.data, "validation", config.num_classes, config.img_size,
                                          train=False, workers=max(1, workers))
        if len(self.train_set) < config.batch_size * world_size:
            raise ValueError(f"{Path(config.data) / 'images' / 'training'} holds {len(self.train_set)} images, fewer "
                             f"than one batch ({config.batch_size} x {world_size} processes); lower --batch-size")
        encoder, self.source = build_encoder(config)
        self.model = UperNetSegmenter(encoder, config.num_classes, channels=config.head_channels,
                                      aux_weight=config.aux_weight,
                                      grad_checkpointing=config.grad_checkpointing).to(self.device)
        if world_size > 1:  # mmseg's SyncBN: statistics over the whole batch, not each process's share
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.sampler = EpochSampler(len(self.train_set), config.seed, rank, world_size, keys=True)
        # its own generator: a new iterator (each epoch, each resume) must not draw from the global
        # stream that drop path uses, or a resumed run would drift from an uninterrupted one
        self.train_loader = DataLoader(self.train_set, config.batch_size, sampler=self.sampler, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(config.seed))

    def param_groups(self) -> list[dict]:
        return layer_decay_groups(self.model, self.config.lr, self.config.weight_decay, self.config.layer_decay)

    def schedule(self, step: int, total: int) -> float:
        """lr factor (times each group's ``lr_scale`` x --lr) of optimizer step ``step`` of ``total``."""
        floor = self.config.min_lr / self.config.lr
        return poly_schedule(step, total, min(self.config.warmup_steps, total), self.config.poly_power, floor)

    def loss(self, batch) -> torch.Tensor:
        images, labels = batch
        return self.model.loss(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """mIoU, mAcc, aAcc (percent) over the validation split at the labels' own size; each
        prediction written as ``OUT/predictions/<stem>.png`` (class + 1), replacing the last evaluation's."""
        from lomar.checkpoints.io import atomic_write_bytes

        model, config = self.model, self.config
        was_training = model.training
        model.eval()
        stride = config.eval_stride or config.img_size * 2 // 3
        confusion = torch.zeros(config.num_classes, config.num_classes, dtype=torch.int64)
        folder = Path(config.out) / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            for index in range(len(self.val_set)):
                image, labels, stem = self.val_set[index]
                logits = predict_logits(model, image[None].to(self.device), config.num_classes, config.eval_mode,
                                        config.img_size, stride)
                logits = F.interpolate(logits.float(), size=labels.shape, mode="bilinear", align_corners=False)
                pred = logits.argmax(1)[0].cpu()
                confusion += confusion_matrix(pred, labels, config.num_classes)
                atomic_write_bytes(folder / f"{stem}.png", _png(pred.numpy().astype(np.uint8) + 1))
        finally:
            model.train(was_training)
        metrics = segmentation_metrics(confusion)
        return {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")}

    def state(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        pass

    def finish(self, out: Path) -> None:
        """Nothing beyond what :meth:`evaluate` wrote: the predictions of the last evaluation."""


def _png(labels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, "PNG")
    return buffer.getvalue()
