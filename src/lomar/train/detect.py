"""``lomar detect`` as a Task of the shared run lifecycle: Mask R-CNN on a LoMaR encoder, COCO data, COCO AP.

The task builds the model (:class:`lomar.models.mask_rcnn.ViTMaskRCNN`), the loaders
(:mod:`lomar.data.coco`, large-scale jitter), the loss (the sum of Mask R-CNN's five losses),
ViTDet's step lr schedule (the ``lr_schedule`` hook) and the evaluation
(:func:`lomar.eval.coco.coco_metrics`); the run itself (folder, lock, optimizer, checkpoints, signals,
DDP) is :func:`lomar.train.lifecycle.run`'s. Under torchrun each process predicts every W-th validation
image; the main process gathers the detections, scores them and sends every process the metrics.
``--eval-only`` scores a trained detector in one process, without a training run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from lomar.checkpoints.io import atomic_write_text
from lomar.checkpoints.kinds import DETECT_FORMAT, FoundCheckpoint
from lomar.checkpoints.peek import holds_beit
from lomar.data.coco import (
    CocoSplit,
    collate_detection,
    collate_detection_refill,
    detection_dataset,
    read_coco,
    training_split,
)
from lomar.data.coco_images import check_split_images
from lomar.data.coco_shared import shared_split
from lomar.data.jitter import eval_transforms, train_transforms
from lomar.data.samplers import EpochSampler
from lomar.errors import UsageError
from lomar.eval.coco import coco_metrics, to_coco_results
from lomar.eval.features import load_pretrained_encoder
from lomar.integrations.dense import with_rel_pos
from lomar.integrations.detection import detector_param_groups
from lomar.models.attention import vitdet_global_blocks
from lomar.models.mask_rcnn import ViTMaskRCNN, unpasted_masks
from lomar.models.masking import grid_size
from lomar.models.modes import eval_mode
from lomar.models.relpos import fit_axis_tables
from lomar.models.spec import model_spec
from lomar.models.vit import VisionTransformer, ViTConfig, model_config
from lomar.train.detect_config import PREDICTIONS, DetectConfig
from lomar.train.distributed import DistInfo
from lomar.train.encoder_settings import encoder_layout, unused_encoder_flags
from lomar.train.eval_only import over_note, score_only, scored_split
from lomar.train.lifecycle import run
from lomar.train.monitor import metric_text
from lomar.train.preemption import ignore_stop_signals
from lomar.train.setting_flags import flags_by_setting
from lomar.train.task import Task, TrainingError
from lomar.train.task_resume import load_resumed, resume_line, resumed_encoder_config
from lomar.train.untrained import untrained_classes
from lomar.values import listed

__all__ = ["DetectTask", "step_lr_factor", "step_lr", "detect", "category_change", "untrained_categories",
           "unboxed_categories"]


def step_lr_factor(step: int, total: int, warmup: int) -> float:
    """ViTDet's schedule as a factor of the peak lr: linear warm-up from 0.001 over ``warmup``
    steps, then x0.1 at 8/9 and x0.01 at 26/27 of ``total`` steps (its steps 163,889 and 177,546 of 184,375)."""
    factor = 0.1 ** sum(step >= round(total * f) for f in (8 / 9, 26 / 27))
    if step < warmup:
        factor *= 0.001 + (1 - 0.001) * step / warmup
    return factor


def step_lr(step: int, total: float, warmup: float, base_lr: float, min_lr: float) -> float:
    """ViTDet's step schedule (:func:`step_lr_factor`) x the peak lr; ``min_lr`` does not apply."""
    return base_lr * step_lr_factor(step, round(total), round(warmup))


def _layout(config: DetectConfig, depth: int | None) -> dict:
    """Encoder settings the detector overrides; ``depth`` None leaves ViTDet's global blocks to the loader."""
    layout = {**encoder_layout(config), "drop_path": config.drop_path, "img_size": config.img_size}
    if depth is not None and layout["global_blocks"] is None:
        layout["global_blocks"] = vitdet_global_blocks(depth)
    return layout


def _fit_to_layout(state: dict, model: torch.nn.Module, saved: ViTConfig) -> dict:
    """A saved detector's weights for ``model``, whose input or window size may differ from the ``saved``
    encoder's: per-axis relative position tables and the absolute table (trained or not, as every loader does)
    are resampled."""
    own = model.state_dict()
    state = fit_axis_tables(state, {k: v.shape for k, v in own.items()})
    source = grid_size(saved.img_size, saved.patch_size)
    for key in [k for k in state if k.endswith("encoder.pos_embed") and k in own]:
        state[key] = model.backbone.encoder.fit_pos_embed(state[key], source)
    return state


class DetectTask(Task):
    """Mask R-CNN training and COCO evaluation (a :class:`~lomar.train.task.Task` of the lifecycle)."""

    name, best_metric, outputs = "detect", "box_AP", (PREDICTIONS,)
    evaluation_outputs = outputs  # each evaluation of a run writes them: _keep_predictions
    # torchvision's loss names, in the order its Mask R-CNN returns them
    loss_parts = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
    lr_schedule = staticmethod(step_lr)

    def __init__(self, config: DetectConfig, info: DistInfo, device: torch.device):
        self.config, self.info, self.device = config, info, device
        rank, world_size, self.eval_steps = info.rank, info.world_size, config.eval_every
        log = self.log = stderr_log if info.is_main else (lambda message: None)  # the main process says it
        # one process per machine parses each file (lomar.data.coco_shared); the main one also keeps the val dict
        self.val = shared_split(lambda: read_coco(config.val_ann, config.val_images, "--val-ann", "--val-images"),
                                config.val_ann, config.val_images, "val", keep=info.is_main)
        if not self.val.summary.boxes:  # pycocotools would score nothing and every AP would be undefined
            raise UsageError(f"{self.val.path}: no annotation to score (each is a crowd region or of zero area); "
                             f"COCO AP needs non-crowd boxes in the validation split")
        log(f"lomar detect: val {self.val.path}: {self.val.summary.line(scored=True)}")
        load_resumed(self)  # other categories: refused before the images' check, the model
        if info.is_main:  # not first found after an epoch; one process reads the headers, its error stops all
            check_split_images(self.val, "--val-images", config.workers or 1)
        self.categories = self.val.categories
        self.source: dict = {}  # a saved detector's file and step, which --eval-only's line names
        self.model = self._build_model(config.detector)
        self.model.to(device)
        self.train_loader = None
        if not config.eval_only:
            train = shared_split(lambda: training_split(read_coco(config.train_ann, config.train_images, "--train-ann",
                                                                  "--train-images")),
                                 config.train_ann, config.train_images, "train")
            log(f"lomar detect: train {train.path}: {train.summary.line()}")
            if why := category_change(self.val.categories, self.val.names, train, f"in {self.val.path}"):
                raise UsageError(f"{why}; both splits need the same categories")
            for words in (untrained_categories(self.val, train), unboxed_categories(self.val, train)):
                if words:
                    log(f"lomar detect: warning: {words}")
            dataset = detection_dataset(train, train_transforms(config.img_size, config.jitter), train=True,
                                        seed=config.seed)
            sampler = EpochSampler(len(dataset), config.seed, rank, world_size)
            self.train_loader = DataLoader(dataset, config.batch_size, sampler=sampler, drop_last=True,
                                           collate_fn=collate_detection_refill, num_workers=config.workers,
                                           worker_init_fn=ignore_stop_signals,
                                           generator=torch.Generator().manual_seed(config.seed + rank))
        val_set = detection_dataset(self.val, eval_transforms(), train=False)
        # Its own generator: an evaluation then draws nothing from the global stream (resume stays exact).
        self.val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world_size)), config.batch_size,
                                     collate_fn=collate_detection, num_workers=config.workers,
                                     worker_init_fn=ignore_stop_signals, generator=torch.Generator())
        self.predictions: list[dict] = []

    def _build_model(self, found: FoundCheckpoint | None):
        cfg = self.config
        rebuilt = resumed_encoder_config(cfg)  # a resume's: the run's own encoder, whose weights the lifecycle loads
        saved = found.path if found is not None and rebuilt is None else None
        if rebuilt is not None:
            encoder = VisionTransformer(rebuilt)
            self.log(f"lomar detect: {resume_line(cfg)}")
        elif saved is not None:  # DetectConfig.complete read it and took its layout
            ckpt = found.take()
            if why := category_change(ckpt["categories"], ckpt.get("category_names"), self.val, f"in {saved}"):
                raise UsageError(f"--pretrained: {why}; evaluate on the split it was trained for")
            # the detector's own layout, unless given (DetectConfig.complete, which refuses another --rel-pos): the
            # same weights either way
            encoder_config = ViTConfig.from_dict(ckpt["encoder_config"])
            encoder = VisionTransformer(replace(encoder_config, **_layout(cfg, encoder_config.depth)))
        elif cfg.pretrained:
            try:
                encoder = load_pretrained_encoder(cfg.pretrained, **_layout(cfg, None))
            except ValueError as exc:
                if not holds_beit(cfg.pretrained):
                    raise UsageError(f"--pretrained {cfg.pretrained}: {exc}") from None
                encoder = None  # a BEiT encoder refuses the ViTDet layout it has no place for
            if not isinstance(encoder, VisionTransformer):
                raise UsageError(f"--pretrained {cfg.pretrained}: only LoMaR / MAE ViT encoders can be detection "
                                 f"backbones, not {'BEiT' if encoder is None else type(encoder).__name__}")
            self.log(f"lomar detect: {encoder.load_report.summary(flags_by_setting(cfg))}")
        else:
            config = model_config(cfg.model)
            encoder = VisionTransformer(model_config(cfg.model, **_layout(cfg, config.depth)))
            self.log(f"lomar detect: no --pretrained: {cfg.model} randomly initialised")
        if saved is None and rebuilt is None:
            try:
                encoder = with_rel_pos(encoder, cfg.rel_pos, "decomposed")
            except ValueError as exc:
                raise UsageError(f"--rel-pos {cfg.rel_pos}: {exc}") from None
            if cfg.pretrained and encoder.config.rel_pos != "none":  # new weights the load line above cannot name
                self.log(f"lomar detect: relative position term: {encoder.config.rel_pos}, added to every block from "
                         f"zero (the pretrained encoder has none; --rel-pos none leaves it out)")
        cfg.rel_pos = encoder.config.rel_pos  # auto resolved: what the checkpoint records and a resume rebuilds
        encoder.set_grad_checkpointing(cfg.grad_checkpointing)
        model = ViTMaskRCNN(encoder, len(self.categories), cfg.img_size, train_pos_embed=cfg.train_pos_embed,
                            rois_per_image=cfg.rois_per_image)
        for note in unused_encoder_flags(cfg, encoder):
            self.log(f"lomar detect: note: {note}")
        if saved is not None:
            model.load_state_dict(_fit_to_layout(ckpt["model"], model, encoder_config))
            self.source = {"checkpoint": str(saved), "step": ckpt.get("step")}  # of a folder: best.pt, else last.pt
            self.log(f"lomar detect: detector loaded from {saved} (step {ckpt.get('step', '?')}), "
                     f"{cfg.img_size} px input")
        return model

    # ---- the Task interface ----------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return detector_param_groups(self.model, self.config.weight_decay, self.config.layer_decay)

    def loss(self, batch) -> dict[str, torch.Tensor] | None:
        """The RPN, box and mask losses of one batch (images, targets), ``loss_parts``; ``model`` in train
        mode. The lifecycle trains on their sum and logs each. None when every image of the batch was skipped."""
        if not batch[0]:  # every image of the batch was skipped
            return None
        images, targets = batch
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        return self.net(images, targets)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | dict | None]:
        """box_* and mask_* COCO AP in percent over the validation split, and ``val_images`` where images were skipped
        (:func:`~lomar.train.eval_only.scored_split`; every process gets them, {} where the main process's scoring
        failed); the main process keeps the predictions."""
        # seen: the images read; one skipped (warned of at its first read) is left out of the scores and counted
        results, seen, skipped = [], [], []
        # masks pasted a few at a time (unpasted_masks): torchvision pastes each image's 100 at its size at once
        with eval_mode(self.model), unpasted_masks(self.model):
            for batch in self.val_loader:
                images, targets = batch
                skipped.extend(getattr(batch, "bad", []))
                if not images:  # every image of the batch was skipped
                    continue
                outputs = self.model([image.to(self.device) for image in images])
                for output, image, target in zip(outputs, images, targets):
                    seen.append(int(target["image_id"]))
                    results.extend(to_coco_results(output, seen[-1], self.categories,
                                                   image_size=tuple(image.shape[-2:])))
        if not self.info.enabled:
            self.predictions = results
            metrics = self._scored(results, seen, skipped)
            if not self.config.eval_only:  # --eval-only's are written in finish
                self._keep_predictions(self.config.out)
            return metrics
        gathered = [None] * self.info.world_size if self.info.is_main else None
        dist.gather_object((results, seen, skipped), gathered, dst=0)
        metrics: list = [None]  # stays None where the main process's scoring failed
        failure = None
        if self.info.is_main:
            self.predictions = sorted((r for part, _, _ in gathered for r in part), key=lambda r: r["image_id"])
            try:
                metrics = [self._scored(self.predictions, [i for _, ids, _ in gathered for i in ids],
                                        [line for _, _, lines in gathered for line in lines])]
                if not self.config.eval_only:
                    self._keep_predictions(self.config.out)
            except TrainingError as exc:  # too many skipped: said once, here; the lifecycle stops every process
                failure = exc
            except OSError as exc:  # a full disk: raised alone here, the others would wait for the scores for good
                metrics, failure = [None], TrainingError(f"could not write {exc.filename or PREDICTIONS}: "
                                                         f"{exc.strerror or exc}")
        dist.broadcast_object_list(metrics, src=0)
        if failure is not None:
            raise failure
        return metrics[0] or {}

    def _scored(self, results: list[dict], seen: list[int], skipped: list[str]) -> dict:
        """The metrics of ``results`` over the ``seen`` images, the ``skipped`` ones counted."""
        counts = scored_split(self.val.root, len(self.val.data["images"]), skipped,
                              say=self.info.is_main and self.train_loader is not None)
        return {**coco_metrics(self.val.coco(), results, seen), **counts}

    def state(self) -> dict:
        return {"categories": self.categories, "category_names": self.val.names,
                "encoder_config": self.model.backbone.encoder.config.to_dict(), "format": DETECT_FORMAT,
                "settings": self.config.to_dict(), "model_spec": model_spec(self.model)}  # lomar.load_model's

    def load(self, state: dict) -> None:
        """Refuses a checkpoint of other categories (ids, or names where it kept them): other annotation files
        may resume a run (their paths are run-control settings), other classes may not."""
        if why := category_change(state.get("categories"), state.get("category_names"), self.val, "in the checkpoint"):
            started = state.get("settings", {}).get("val_ann")
            raise UsageError(f"--resume: {why}; resume with annotation files of the run's categories"
                             f"{f' (it started with --val-ann {started})' if started else ''}, or start a new run "
                             f"with another --out")

    def _keep_predictions(self, out: Path | str) -> None:
        """``OUT/predictions.json``: the detections of the evaluation just made. A run's evaluation writes them before
        the checkpoint that follows it, so that a checkpoint of a scored step never goes without them (a kill after
        the run's last checkpoint leaves a resume nothing to evaluate again); ``--eval-only`` in ``finish``."""
        atomic_write_text(Path(out) / PREDICTIONS, json.dumps(self.predictions))

    def finish(self, out: Path) -> None:
        """``--eval-only``'s detections (:meth:`_keep_predictions`); a run's evaluations wrote theirs."""
        if self.config.eval_only:
            self._keep_predictions(out)


def category_change(ids: list[int] | None, names: list[str] | None, split: CocoSplit, where: str) -> str | None:
    """How ``split``'s categories differ from ``ids`` (and ``names``, None where not kept) ``where`` says they
    are; None when they are the same."""
    if ids != split.categories:
        return f"the category ids are {ids} {where} but {split.categories} in {split.path}"
    if names is not None and names != split.names:
        differ = [(i, a, b) for i, a, b in zip(ids, names, split.names) if a != b]
        i, was, now = differ[0]
        return (f"category {i} is {was!r} {where} but {now!r} in {split.path} ({len(differ)} of {len(ids)} "
                f"categories named otherwise: the ids would mean other classes)")
    return None


def untrained_categories(val: CocoSplit, train: CocoSplit) -> str | None:
    """Words on the categories ``val`` scores (it has boxes of them) but ``train`` has no box of: never trained on,
    each scores 0 AP in the mean; None where there are none, or a split does not know its categories with boxes."""
    if val.summary.boxed is None or train.summary.boxed is None:
        return None
    name = dict(zip(val.categories, val.names))
    return untrained_classes(val.summary.boxed, train.summary.boxed, lambda i: f"{i} {name[i]!r}",
                             ("category", "categories"), f"with boxes in {val.path} but none in {train.path}", "AP",
                             "add training boxes of them, or leave them out of the validation file")


def unboxed_categories(val: CocoSplit, train: CocoSplit) -> str | None:
    """Words on the categories the files list but neither split has a box of (an export's class never drawn): left
    out of the AP mean (COCOeval's -1), the head's output for each trained only to say no; None where there are none,
    or a split does not know its categories with boxes."""
    if val.summary.boxed is None or train.summary.boxed is None:
        return None
    unboxed = sorted(set(val.categories) - set(val.summary.boxed) - set(train.summary.boxed))
    if not unboxed:
        return None
    name = dict(zip(val.categories, val.names))
    many = f"{len(unboxed)} {'category' if len(unboxed) == 1 else 'categories'}"
    return (f"{many} of the files with a box in neither {train.path} nor {val.path} (left out of the AP mean; the head "
            f"still has an output for each, trained only to say no): {listed((f'{i} {name[i]!r}' for i in unboxed), 5)}"
            f"; add boxes of them, or leave them out of both files' categories")


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def detect(config: DetectConfig) -> int:
    """Train (or resume) a detector, or with ``--eval-only`` score one; the process exit code."""
    return evaluate_only(config) if config.eval_only else run(config, DetectTask)


def evaluate_only(config: DetectConfig) -> int:
    """Score ``--pretrained`` on the validation split in this process: a ``metrics.jsonl`` line and
    ``predictions.json`` in ``--out`` (the folder locked meanwhile)."""
    task, metrics, out = score_only(config, DetectTask)
    scores = ", ".join(metric_text(key, metrics.get(key)) for key in ("box_AP", "mask_AP"))
    print(f"lomar detect: {scores}{over_note(task.val.root, metrics)}; {out / PREDICTIONS}",
          flush=True)  # the command's result: stdout, as knn's score
    return 0
