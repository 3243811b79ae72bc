"""``lomar segment``: UperNet on a ViT encoder, ADE20K-layout data, mmseg's recipe, mIoU / mAcc / aAcc with
each class's IoU and Acc (``per_class.md`` at the end) and the last evaluation's predictions as PNGs.

:class:`SegmentTask` is a :class:`~lomar.train.task.Task` with its own ``lr_schedule`` (linear warm-up
then poly); the run (folder, lock, resume, signals, DDP, checkpoints, logging) is
:func:`lomar.train.lifecycle.run`'s. Under torchrun each process scores every W-th validation image,
the confusion matrices are summed and the main process writes every prediction. ``--eval-only`` scores a trained
segmenter in one process, without a training run.
"""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lomar.checkpoints.file_names import METRICS
from lomar.checkpoints.io import atomic_write_text, mismatch
from lomar.checkpoints.kinds import SEGMENT_TASK
from lomar.data.collate import Skipped
from lomar.data.pair_checks import BadPairs, BadSplit, splits_refusal
from lomar.data.samplers import EpochSampler
from lomar.data.segmentation import SegmentationFolder, class_names, collate_segmentation
from lomar.errors import LomarError, UsageError
from lomar.eval.features import load_pretrained_encoder
from lomar.eval.segmentation import (
    confusion_matrix,
    label_map,
    label_png,
    lowest_classes,
    per_class_table,
    segmentation_metrics,
    slide_stride,
)
from lomar.integrations.dense import with_rel_pos
from lomar.integrations.segmenter import layer_decay_groups
from lomar.models.beit import BEiTConfig
from lomar.models.modes import eval_mode
from lomar.models.segmenter import UperNetSegmenter, segmentation_losses
from lomar.models.spec import model_spec
from lomar.models.vit import VisionTransformer, ViTConfig, model_config
from lomar.train.distributed import DistInfo
from lomar.train.encoder_settings import unused_encoder_flags
from lomar.train.eval_only import over_note, score_only, scored_split
from lomar.train.lifecycle import run
from lomar.train.monitor import metric_text, read_records
from lomar.train.preemption import ignore_stop_signals
from lomar.train.segment_config import ENCODER_KEYS, SegmentConfig, check_batch_norm_batch
from lomar.train.segment_pngs import WRITTEN, write_label_maps
from lomar.train.task import Task
from lomar.train.task_resume import resume_line, resumed_encoder_config
from lomar.train.untrained import untrained_classes
from lomar.values import counted, percent_text

__all__ = ["SegmentTask", "poly_schedule", "segment", "PER_CLASS"]

PER_CLASS = "per_class.md"  # the last evaluation's per-class table, in the run folder


def poly_schedule(step: int, total: int, warmup: int, power: float = 1.0, floor: float = 0.0) -> float:
    """lr factor of optimizer step ``step`` (0-based) of ``total``: linear warm-up over ``warmup``
    steps (from 1e-6 of the peak, mmseg's LinearLR start), then (1 - t)^power down to ``floor``."""
    if step < warmup:
        return 1e-6 + (1 - 1e-6) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * (1 - t) ** power


def poly_lr(step: int, total: float, warmup: float, base_lr: float, min_lr: float, power: float) -> float:
    """:func:`poly_schedule` x the peak lr, down to ``min_lr``."""
    return base_lr * poly_schedule(step, round(total), round(warmup), power, min_lr / base_lr)


class SegmentTask(Task):
    name, best_metric, outputs = "segment", "mIoU", ("predictions", PER_CLASS)
    # drawn from the log alone: a resume at the run's end (stopped after its last evaluation) writes a missing one
    curves = (PER_CLASS,)
    evaluation_outputs = outputs  # predictions/ of each evaluation; per_class.md of the last, drawn from its record

    def __init__(self, config: SegmentConfig, info: DistInfo, device: torch.device):
        self.config, self.info, self.device = config, info, torch.device(device)
        self.lr_schedule = self.lr_schedule_of(config)
        rank, world_size = info.rank, info.world_size
        self.eval_steps = config.eval_every
        workers = config.workers or 0
        split = partial(SegmentationFolder, config.data, num_classes=config.num_classes, crop=config.img_size,
                        workers=max(1, workers), reduce_zero_label=config.zero_label == "ignore")
        refused: list[BadPairs | BadSplit] = []  # of each split, checked whole: one run tells what is wrong in both
        if not config.eval_only:
            self.train_set = _checked(split, "training", refused, train=True, seed=config.seed,
                                      photometric=config.photometric)
        self.val_set = _checked(split, "validation", refused, train=False)
        if refused:
            raise splits_refusal(refused)
        self.val_folder = self.val_set.root / "images" / "validation"  # the folder a skipped image's note names
        self.class_labels = _class_labels(config)
        if info.is_main and not config.eval_only and (unseen := _untrained_classes(self)):
            print(f"lomar segment: warning: {unseen}", file=sys.stderr, flush=True)
        self.scored: dict = {}  # the last evaluation's metrics, which finish tabulates
        self.source: dict = {}  # --eval-only's segmenter: its file and step, which its record names
        layout = dict(img_size=config.img_size, drop_path=config.drop_path)
        found = config.segmenter if config.eval_only else None
        if found is not None:  # SegmentConfig.complete read it and took its classes, layout and size
            saved, ckpt = found.path, found.take()
            encoder, rebuilt = _trained_encoder(ckpt, saved)
            trained = encoder.config.img_size
            # of a folder: best.pt, else last.pt
            self.source = {"checkpoint": str(saved), "step": ckpt.get("step"), "trained_img_size": trained}
            other = "" if trained == config.img_size else f", not its trained {trained} px"
            other += f"; its encoder{rebuilt}" if rebuilt else ""
            source = f"segmenter loaded from {saved} (step {ckpt.get('step', '?')}), {config.img_size} px{other}"
        elif (rebuilt := resumed_encoder_config(config)) is not None:  # the lifecycle loads the checkpoint's weights
            encoder, source = VisionTransformer(rebuilt), resume_line(config)
        else:  # a resume of a checkpoint saved without its encoder's layout says so
            encoder, source = _starting_encoder(config.model, config.pretrained, config.rel_pos, layout)
            source = resume_line(config) or source
        config.rel_pos = encoder.config.rel_pos  # auto resolved: what the checkpoint records and a resume rebuilds
        if info.is_main:
            term = config.rel_pos
            if term == "none" and encoder.config.pos == "rpe":  # 'none' alone read as if the iRPE were dropped
                term = "none added (the encoder's own iRPE gives its attention relative positions)"
            print(f"lomar segment: {source}; relative position term: {term}", flush=True)  # what it runs: stdout
            for note in unused_encoder_flags(config, encoder):
                print(f"lomar segment: note: {note}", file=sys.stderr, flush=True)
        # The pyramid taps blocks, never the final norm: left trainable, DDP would wait for its gradient.
        encoder.norm.requires_grad_(False)
        self.model = UperNetSegmenter(encoder, config.num_classes, channels=config.head_channels,
                                      aux_weight=config.aux_weight,
                                      grad_checkpointing=config.grad_checkpointing,
                                      train_pos_embed=config.train_pos_embed).to(self.device)
        self.loss_parts = ("loss_decode", "loss_aux") if self.model.aux_head is not None else ("loss_decode",)
        if found is not None:
            self.model.load_state_dict(ckpt["model"])
            return
        if world_size > 1 and self.device.type == "cuda":
            # mmseg's SyncBN: statistics over the whole batch, not each process's share (CUDA only in
            # PyTorch; a CPU run keeps each process's own statistics)
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        else:
            check_batch_norm_batch(config.batch_size)
        self.sampler = EpochSampler(len(self.train_set), config.seed, rank, world_size, keys=True)
        # its own generator: a new iterator (each epoch, each resume) must not draw from the global
        # stream that drop path uses, or a resumed run would drift from an uninterrupted one
        self.train_loader = DataLoader(self.train_set, config.batch_size, sampler=self.sampler, drop_last=True,
                                       collate_fn=collate_segmentation, num_workers=workers,
                                       persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals,
                                       generator=torch.Generator().manual_seed(config.seed))

    def param_groups(self) -> list[dict]:
        """Layer-decay groups; the lifecycle sets each group's lr to the schedule's x its ``lr_scale``."""
        return layer_decay_groups(self.model, self.config.lr, self.config.weight_decay, self.config.layer_decay)

    @classmethod
    def lr_schedule_of(cls, config: SegmentConfig):
        """The heads' lr at optimizer step ``step``: linear warm-up, then poly down to ``min_lr``."""
        return partial(poly_lr, power=config.poly_power)

    def describe(self) -> str:
        return (f"{len(self.train_set)} training / {len(self.val_set)} validation images in {self.config.data}, "
                f"{self.config.num_classes} classes (label 0: {self.config.zero_label}), {self.config.img_size} px")

    def loss(self, batch) -> dict[str, torch.Tensor] | None:
        """The decode head's and the weighted auxiliary head's cross-entropy (``loss_parts``); None when
        every image of the batch was skipped."""
        if not len(batch[0]):
            return None
        images, labels = (t.to(self.device, non_blocking=True) for t in batch)
        return segmentation_losses(*self.net(images, aux=True), labels, self.model.aux_weight)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | list | dict | None]:
        """mIoU, mAcc, aAcc (percent) and each class's IoU and Acc (lists, percent) over the validation split at
        the labels' own size, ``eval``: the mode and stride (None for ``whole``) scored with (every process gets
        them), and the main process's ``val_images`` where images were skipped
        (:func:`~lomar.train.eval_only.scored_split`); each prediction written as ``OUT/predictions/<stem>.png``
        in the annotations' encoding (class + 1, or the class with ``--zero-label class``) by the main process,
        replacing the last evaluation's, whose PNGs of images not scored now are removed
        (:func:`~lomar.train.segment_pngs.write_label_maps`)."""
        model, config, info = self.model, self.config, self.info
        stride = slide_stride(config.eval_stride, config.img_size)
        confusion = torch.zeros(config.num_classes, config.num_classes, dtype=torch.int64)
        pngs, skipped = [], []
        with eval_mode(model):
            for index in range(info.rank, len(self.val_set), info.world_size):
                if isinstance(item := self.val_set[index], Skipped):  # warned of at its first read; counted
                    skipped.append(item)
                    continue
                image, labels, stem = item
                pred = label_map(model, image[None].to(self.device), tuple(labels.shape), config.num_classes,
                                 config.eval_mode, config.img_size, stride)
                confusion += confusion_matrix(pred, labels, config.num_classes)
                pngs.append((stem, label_png(pred, config.zero_label)))
        if info.enabled:
            confusion = confusion.to(self.device)
            dist.all_reduce(confusion)
            gathered = [None] * info.world_size if info.is_main else None
            dist.gather_object((pngs, skipped), gathered, dst=0)
            pngs = [item for part, _ in gathered or () for item in part]
            skipped = [line for _, lines in gathered or () for line in lines]
        counts = {}
        if info.is_main:  # too many skipped: the main process raises, the lifecycle stops every one
            counts = scored_split(self.val_folder, len(self.val_set), skipped, say=not config.eval_only)
            if left := write_label_maps(folder := Path(config.out) / "predictions", pngs):
                print(f"lomar segment: note: {counted(left, 'other PNG')} left in {folder}, which lomar cannot tell "
                      f"from yours (it held no {WRITTEN} listing the ones it wrote): remove any an earlier evaluation "
                      f"wrote", file=sys.stderr, flush=True)
        metrics = segmentation_metrics(confusion.cpu())
        # NaN: no labelled pixel was scored; None says undefined, as detect's metrics do (and JSON has no NaN)
        self.scored = {k: [_defined(v) for v in metrics[k]] if isinstance(metrics[k], list) else _defined(metrics[k])
                       for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc")}
        # how: --eval-mode / --eval-stride may change on a resume, and --eval-only may score otherwise than the run did
        self.scored["eval"] = {"mode": config.eval_mode, "stride": stride if config.eval_mode == "slide" else None}
        self.scored.update(counts)  # per_class.md says a score over part of the split as the record does
        return self.scored

    def finish(self, out: Path) -> None:
        """``OUT/per_class.md``: the last evaluation's table of every class; its five lowest IoUs on one line."""
        if not self.scored:  # a resume found the run at its end, its evaluation made before: draw_curves' file
            return
        sizes = (self.config.img_size, self.source["trained_img_size"]) if self.source else None
        path = _write_per_class(Path(out), self.scored, self.class_labels, sizes)
        lowest = lowest_classes(self.scored["IoU"], self.class_labels)
        print(f"lomar segment: lowest IoU (%): {lowest or 'none defined'}; every class in {path}", flush=True)

    @staticmethod
    def draw_curves(config: SegmentConfig, out: Path) -> None:
        """``OUT/per_class.md`` from the log's last evaluation record, which holds every class's IoU and Acc: for a
        resume at the run's end, unbuilt, that finds it missing (a run stopped between that evaluation and its
        finish), with nothing scored in memory."""
        scored = next((r for r in reversed(read_records(Path(out) / METRICS)) if "IoU" in r), None)
        if scored is not None:
            _write_per_class(Path(out), scored, _class_labels(config))

    def state(self) -> dict:
        """What ``--resume`` reads back (the settings) besides the lifecycle's position and weights."""
        return {"task": SEGMENT_TASK, "settings": self.config.to_dict(),
                "encoder_config": self.model.encoder.config.to_dict(),  # what --eval-only rebuilds
                "model_spec": model_spec(self.model)}  # what lomar.load_model rebuilds


def _untrained_classes(task) -> str | None:
    """Words on the classes some validation annotation holds but no training one (read by the splits' start-up
    check): never trained on, each scores 0 IoU in the mean; None where there are none."""
    return untrained_classes(task.val_set.classes_held, task.train_set.classes_held, task.class_labels.__getitem__,
                             ("class", "classes"), "in the validation annotations but in no training one", "IoU",
                             "add training images of them, or check --num-classes and --zero-label",
                             numbered=", as the annotations number them")


def _class_labels(config: SegmentConfig) -> list[str]:
    """Each class as the annotations number it, with ADE's name where its class list is there (ids 1..N)."""
    reduce_zero_label = config.zero_label == "ignore"
    names = class_names(config.data, config.num_classes) if reduce_zero_label else None
    return [f"{n + reduce_zero_label}{f' {names[n]}' if names else ''}" for n in range(config.num_classes)]


def _write_per_class(out: Path, m: dict, labels: list[str], sizes: tuple[int, int] | None = None) -> Path:
    """``OUT/per_class.md`` of an evaluation's metrics ``m`` (mIoU, mAcc, aAcc and the per-class lists); ``sizes``:
    the size --eval-only scored at and the one the segmenter was trained at."""
    at = ""
    if sizes is not None:
        at = f" at {sizes[0]} px, " + ("its trained size" if sizes[0] == sizes[1] else f"not its trained {sizes[1]} px")
    part = m.get("val_images")
    over = f" over {part['scored']} images ({part['skipped']} unreadable skipped)" if part else ""
    head = (f"Per-class scores (percent) of {out}'s last evaluation{at}{over}: mIoU {percent_text(m['mIoU'])}, mAcc "
            f"{percent_text(m['mAcc'])}, aAcc {percent_text(m['aAcc'])}; classes as the annotations number them\n\n")
    return atomic_write_text(out / PER_CLASS, head + per_class_table(m["IoU"], m["Acc"], labels))


def _checked(split, name: str, refused: list[BadPairs | BadSplit], **kwargs) -> SegmentationFolder | None:
    """``split(name, **kwargs)``, the split built; None where it is refused (its layout, its class ids, its bad
    pairs), the refusal added to ``refused`` so that the next split is checked too."""
    try:
        return split(name, **kwargs)
    except (BadPairs, BadSplit) as bad:
        refused.append(bad)
        return None


def _starting_encoder(model: str, pretrained: str | None, rel_pos: str, layout: dict) -> tuple[VisionTransformer, str]:
    """A run's encoder before training, and what it is: ``model`` at random, or the ``pretrained`` encoder (anything
    `lomar export` reads), with the relative position term ``rel_pos``. UsageError in one line otherwise."""
    if pretrained is None:
        encoder, source = VisionTransformer(model_config(model, **layout)), f"random init {model} (no --pretrained)"
    else:
        encoder = load_pretrained_encoder(pretrained, **layout)
        source = f"pretrained: {encoder.load_report.summary()}"
        if not isinstance(encoder, VisionTransformer):
            kind = "BEiT" if isinstance(getattr(encoder, "config", None), BEiTConfig) else type(encoder).__name__
            raise UsageError(f"--pretrained {pretrained}: only LoMaR / MAE ViT encoders can be segmentation "
                             f"backbones, not {kind}")
    try:
        return with_rel_pos(encoder, rel_pos, "bias"), source
    except ValueError as exc:
        raise UsageError(f"--rel-pos {rel_pos}: {exc}") from None


def _trained_encoder(ckpt: dict, path: Path) -> tuple[VisionTransformer, str]:
    """--eval-only's segmenter's encoder as it was trained (``ckpt``, read from ``path``), and how it was rebuilt (''
    from its ``encoder_config``): in a checkpoint saved before those, from its settings as a resume of its run builds
    it (its --model, or the --pretrained encoder it started from, at its size, with its relative position term)."""
    if isinstance(ckpt.get("encoder_config"), dict):
        return VisionTransformer(ViTConfig.from_dict(ckpt["encoder_config"])), ""
    own = SegmentConfig.saved_settings(ckpt, path) or {}
    layout = dict(img_size=own.get("img_size"), drop_path=own.get("drop_path", 0.0))
    start, name = own.get("pretrained"), own.get("model")
    old = f"--pretrained {path} is a `lomar segment` checkpoint saved without its encoder's layout"
    if start and not Path(start).exists():
        raise UsageError(f"{old}: it is rebuilt from the encoder its run started from, {start}, which is missing; "
                         f"put that encoder (a copy or its export) back at {start}")
    if not (start or (name and layout["img_size"])):
        raise UsageError(f"{old}, and its settings name no --model or --pretrained to rebuild it from; retrain it "
                         f"with `lomar segment`, whose checkpoints keep the layout")
    how = f" rebuilt from its run's starting encoder {start}" if start else f" rebuilt as its run's --model {name}"
    fix = (f"put the encoder its run started from back at {start}" if start
           else "retrain it with `lomar segment`, whose checkpoints keep the layout")
    try:
        encoder, _ = _starting_encoder(name, start, own["rel_pos"], layout)
        # here, before the task says what it loaded: a file at that path replaced since, or another lomar's --model
        encoder.load_state_dict({k.removeprefix(ENCODER_KEYS): v for k, v in ckpt["model"].items()
                                 if k.startswith(ENCODER_KEYS)})
    except (LomarError, ValueError) as exc:
        raise UsageError(f"{old}; its encoder{how} fails: {str(exc).rstrip('.')}; {fix}") from None
    except RuntimeError as exc:
        why = mismatch(exc).rstrip(".")
        raise UsageError(f"{old}; its encoder{how} does not fit its weights: {why}; {fix}") from None
    return encoder, how


def _defined(value: float) -> float | None:
    return None if math.isnan(value) else value


def segment(config: SegmentConfig) -> int:
    """Train (or resume) a segmenter, or with ``--eval-only`` score one; the process exit code."""
    return evaluate_only(config) if config.eval_only else run(config, SegmentTask)


def evaluate_only(config: SegmentConfig) -> int:
    """Score ``--pretrained`` on the validation split in this process: a ``metrics.jsonl`` record, predictions/ and
    per_class.md in ``--out`` (the folder locked meanwhile)."""
    task, metrics, out = score_only(config, SegmentTask)
    scores = ", ".join(metric_text(key, metrics[key]) for key in ("mIoU", "mAcc", "aAcc"))
    print(f"lomar segment: {scores}{over_note(task.val_folder, metrics)}; {out / 'predictions'}",
          flush=True)  # the command's result: stdout, as knn's score
    return 0
