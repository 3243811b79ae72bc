"""``lomar finetune``: end-to-end classification finetuning with the original recipe (SPEC §3).

timm supplies the recipe's pieces: the RandAugment / random-erasing transform
(``create_transform``), Mixup/CutMix with label smoothing (``Mixup``), the soft-target loss
and the layer-wise lr decay parameter groups (``param_groups_layer_decay``, driven by
``VisionTransformer.group_matcher``: stem = layer 0, block i = layer i+1, final norm and head
= top layer, scaled decay^(top − layer)). The lr follows ``lomar.lr_schedule.lr_at`` per
iteration: linear warm-up, cosine to ``--min-lr``. ``--eval-only`` scores a trained classifier (a run's best.pt,
else last.pt, or a checkpoint) on a validation folder in one process, without a training run. The run itself
(checkpoints, ``best.pt`` on top-1, resume with the RNG state, so a resumed run continues exactly: each training
image's augmentation is seeded by (seed, epoch, index), whichever worker makes it; the lock, preemption, logging) is
:mod:`lomar.train.lifecycle`'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.beit import Beit
from timm.optim import param_groups_layer_decay
from torch.utils.data import DataLoader, Subset

from lomar.checkpoints.formats import VitReader, identify
from lomar.checkpoints.formats_beit import BEiTFinetuneReader
from lomar.checkpoints.kinds import FINETUNE_FORMAT
from lomar.data.class_names import classes_only_in, relabel, unicode_forms_note
from lomar.data.classify import SeededSamples, classification_transforms, draft_eval_load, eval_resize
from lomar.data.collate import collate_labelled, collate_labelled_refill
from lomar.data.draft_classify import DraftCropFolder
from lomar.data.folder import LabelledImageFolder
from lomar.data.image_names import THUMBNAIL_FOLDERS, passed_over_folder
from lomar.data.samplers import EpochSampler
from lomar.data.small_images import SmallImages
from lomar.errors import UsageError, said_by_first_on_machine
from lomar.eval.features import load_pretrained_encoder
from lomar.models.beit import BEiTConfig, timm_global_pool
from lomar.models.beit_classifier import BEiTClassifier
from lomar.models.modes import eval_mode
from lomar.models.spec import model_spec
from lomar.models.vit import VisionTransformer
from lomar.train.distributed import DistInfo
from lomar.train.encoder_settings import encoder_layout, unused_encoder_flags
from lomar.train.eval_only import over_note, score_only, scored_split
from lomar.train.finetune_config import FinetuneConfig, split_roots
from lomar.train.lifecycle import run
from lomar.train.monitor import metric_text
from lomar.train.precision import autocast_factory, trained_precision_kept
from lomar.train.preemption import ignore_stop_signals
from lomar.train.run_lines import say_notes
from lomar.train.setting_flags import flags_by_setting
from lomar.train.task import Task
from lomar.train.task_resume import load_resumed, resume_line, resumed_encoder_config
from lomar.values import counted

__all__ = ["finetune", "FinetuneTask"]


def _loaders(config: FinetuneConfig, train_root: Path, val_root: Path,
             info: DistInfo) -> tuple[DataLoader | None, DataLoader, list[str]]:
    """(train, val, the class names); --eval-only: no training loader, val's classes as the classifier's."""
    train_tf, val_tf = classification_transforms(config.img_size, config.aa, config.reprob, config.crop_scale)
    try:  # every process lists the class folders alike: the first of each machine says what it left out
        with said_by_first_on_machine():
            train_set = None if config.eval_only else LabelledImageFolder(train_root, train_tf)
            val_load = draft_eval_load(val_tf) if config.decode == "draft" else None
            val_set = LabelledImageFolder(val_root, val_tf, val_load)
            if train_set is None:  # --eval-only: each label the row of its class's name in the classifier's head
                saved = config.classifier.checkpoint
                relabel(val_set, saved.get("classes"), saved.get("num_classes"), config.classifier.path)
            else:
                train_set.check_classes()
                train_set.match_classes(val_set)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # Each rank scores a disjoint slice of val (no padding duplicates), counts are summed.
    val_part = Subset(val_set, range(info.rank, len(val_set), info.world_size))
    workers = config.workers
    # Own generators: creating an iterator then draws nothing from the global torch stream,
    # which the augmentation uses and the checkpoint saves (exact resume).
    common = dict(num_workers=workers, persistent_workers=workers > 0,
                  worker_init_fn=ignore_stop_signals if workers > 0 else None)
    val = DataLoader(val_part, config.batch_size, collate_fn=collate_labelled, generator=torch.Generator(),
                     **common)
    if train_set is None:
        return None, val, val_set.classes
    sampler = EpochSampler(len(train_set), config.seed, info.rank, info.world_size)  # (index, epoch) keys
    # augmentation seeded per sample: resumes exactly (and draft crops draw full's boxes from the same stream)
    train_items = SeededSamples(DraftCropFolder(train_set) if config.decode == "draft" else train_set, config.seed)
    train = DataLoader(train_items, config.batch_size, sampler=sampler, drop_last=True,
                       collate_fn=collate_labelled_refill,
                       generator=torch.Generator().manual_seed(config.seed + info.rank), **common)
    return train, val, train_set.classes


class _BEiTLayers:
    """A timm ``Beit`` grouped as BEiT's ``get_num_layer_for_vit``: stem, blocks, and all else (the final norm too)
    the top layer; timm's matcher joins ``norm`` to the last block."""

    def __init__(self, model: Beit):
        self.model, self.named_parameters = model, model.named_parameters

    def group_matcher(self, coarse: bool = False) -> dict:
        return {**self.model.group_matcher(coarse), "blocks": r"^blocks\.(\d+)"}


class FinetuneTask(Task):
    """The classifier on a pretrained encoder, the recipe's augmentation and loss, top-1/top-5 on val."""

    name, best_metric = "finetune", "top1"
    eval_epoch_index = True

    def __init__(self, config: FinetuneConfig, info: DistInfo, device: torch.device):
        self.config, self.info, self.device = config, info, device
        self.crop_size = config.img_size  # a training image under it on its shorter side is upscaled: counted
        self.val_resize, self.small_counted = eval_resize(config.img_size), False  # and a validation image under this
        self.train_loader, self.val_loader, self.classes = _loaders(config, *split_roots(config), info)
        self.source: dict = {}  # --eval-only's classifier: its file and step, which its record names
        if config.eval_only:
            self.model, trained = _trained_classifier(config, len(self.classes))
            self.model.to(device)
            # under auto, config.precision is the one the classifier records having trained in (auto: none recorded)
            setting, recorded = ("auto", config.precision) if config.precision_auto else (config.precision, None)
            precision, note = trained_precision_kept(setting, recorded, "the classifier", device)
            self.autocast = autocast_factory(precision, device)  # as a run's
            if note:
                print(f"lomar finetune: note: {note}", file=sys.stderr, flush=True)
            path, step = config.classifier.path, config.classifier.checkpoint.get("step")
            self.source = {"checkpoint": str(path), "step": step, "trained_img_size": trained}
            other = "" if trained == config.img_size else f", not its trained {trained} px"
            print(f"lomar finetune: classifier loaded from {path} (step {step}), {config.img_size} px{other}, "
                  f"{len(self.classes)} classes", flush=True)  # what it runs, as the start-up line: stdout
            return
        load_resumed(self)  # other classes: refused before the model and its weights
        if isinstance(encoder := resumed_encoder_config(config), BEiTConfig):  # the lifecycle loads the weights
            classes = len(self.classes)
            self.model = BEiTClassifier(encoder, classes, timm_global_pool(config.global_pool, classes))
        elif encoder is not None:
            self.model = VisionTransformer(encoder, num_classes=len(self.classes), global_pool=config.global_pool)
        else:
            try:
                self.model = load_pretrained_encoder(config.pretrained, num_classes=len(self.classes),
                                                     classes=self.classes, global_pool=config.global_pool,
                                                     img_size=config.img_size,
                                                     drop_path=config.drop_path, **encoder_layout(config))
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if not config.train_pos_embed and hasattr(self.model, "freeze_pos_embed"):  # timm's Beit has no table
            self.model.freeze_pos_embed()
        if info.is_main:
            source = resume_line(config) or self.model.load_report.summary(flags_by_setting(config))
            print(f"lomar finetune: {source}", flush=True)
            say_notes(config, "finetune", unused_encoder_flags(config, self.model, beit=isinstance(self.model, Beit)))
        self.model.set_grad_checkpointing(config.grad_checkpointing)
        self.model.to(device)
        self.mixup = None
        if config.mixup > 0 or config.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                               label_smoothing=config.smoothing, num_classes=len(self.classes))
            self.criterion = SoftTargetCrossEntropy()  # mixup already smoothed the targets
        elif config.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(config.smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()

    def param_groups(self) -> list[dict]:
        """timm's layer-wise lr decay groups; each carries the ``lr_scale`` the lifecycle applies. BEiT's finetuning
        decays the relative position tables, which timm's ``Beit.no_weight_decay`` exempts, and trains a cls-pooling
        model's final norm at the top layer's lr, where timm's ``Beit.group_matcher`` gives it the last block's."""
        beit = isinstance(self.model, Beit) and self.config.decay_rel_pos_bias
        skip = {"pos_embed", "cls_token"} if beit else self.model.no_weight_decay()
        layers = _BEiTLayers(self.model) if beit else self.model
        return param_groups_layer_decay(layers, self.config.weight_decay, skip, layer_decay=self.config.layer_decay)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        train, val = len(self.train_loader.dataset), len(self.val_loader.dataset.dataset)  # the split, every process's
        shares = (f" ({train // self.info.world_size} and {len(self.val_loader.dataset)} this process)"
                  if self.info.world_size > 1 else "")
        return (f"{train} training and {val} validation images{shares}, {len(self.classes)} classes; ViT "
                f"{self.model.config.embed_dim} wide, {counted(self.model.config.depth, 'block')}, "
                f"{self.config.img_size} px, {params:.1f}M params")

    def loss(self, batch) -> torch.Tensor | None:
        if not batch[0].numel():  # every image of the batch was unreadable
            return None
        images, targets = (t.to(self.device, non_blocking=True) for t in batch)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        # in float32: timm's smoothed and soft-target losses take their own log_softmax, which CPU autocast leaves in
        # bf16 (CUDA's casts it to float32), as the pretraining losses and segment's are taken
        return self.criterion(self.net(images).float(), targets)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | dict]:
        """Top-1 (and, over more than 5 classes, top-5) accuracy in [0, 1] over the whole validation set (all ranks),
        and the main process's ``val_images`` where some were skipped (:func:`~lomar.train.eval_only.scored_split`)."""
        model, device = self.model, self.device
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, scored
        skipped = []  # each warned of at its first read
        # the images smaller than the resize, upscaled: the same at every evaluation, counted and said at the first
        small, self.small_counted = None if self.small_counted else SmallImages(self.val_resize), True
        with eval_mode(model):
            for batch in self.val_loader:
                images, targets = batch
                skipped.extend(getattr(batch, "bad", []))
                if small is not None:
                    small.add(getattr(batch, "sources", ()))
                if not len(targets):  # every image of the batch unreadable
                    continue
                with self.autocast():
                    logits = model(images.to(device))
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hit = top == targets.to(device)[:, None]
                totals += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(targets), device=device)])
        counts, split = {}, self.val_loader.dataset.dataset
        shares = [(skipped, (small.count, small.smallest) if small else None)]  # each process's
        if self.info.enabled:
            dist.all_reduce(totals)
            gathered = [None] * self.info.world_size if self.info.is_main else None
            dist.gather_object(shares[0], gathered, dst=0)
            shares = gathered or []
        if self.info.is_main:  # too many skipped: the main process raises, the lifecycle stops every one
            if small is not None:
                whole = SmallImages(small.size)
                for _, part in shares:
                    whole.join(*part)
                if whole.count:
                    say_notes(self.config, self.name, [f"{split.root}: {whole.line()}"])
            skipped = [line for part, _ in shares for line in part]
            counts = scored_split(split.root, len(split), skipped, say=self.train_loader is not None)
        top5 = {"top5": float(totals[1] / totals[2])} if len(self.classes) > 5 else {}  # else always 1: noise
        return {"top1": float(totals[0] / totals[2]), **top5, **counts}

    def load(self, state: dict) -> None:
        saved = list(state.get("classes") or self.classes)  # as many under other names would swap labels silently
        if saved != self.classes:
            only = classes_only_in(saved, self.classes)
            if only[1] == "none" and all(name.startswith(THUMBNAIL_FOLDERS) for name in only[0]):
                raise UsageError(f"--resume: the checkpoint has a class of thumbnails ({only[0][0]}), which lomar now "
                                 f"leaves out of the class folders; its scores counted them: start a new run")
            # the data it started with, read by the rule that a training folder without an image is no class
            # (LabelledImageFolder.match_classes): 'resume with the data it started with' would not be the fix
            train = split_roots(self.config)[0]
            if only[1] == "none" and only[0] != "none" and all(
                    (train / name).is_dir() and not passed_over_folder(name) for name in only[0]):
                raise UsageError(f"--resume: the checkpoint has a class whose training folder holds no image "
                                 f"({train / only[0][0]}), an output it never trained on; a class folder without a "
                                 f"training image is no class: start a new run (another --out), or give the folder "
                                 f"its training images and resume")
            raise UsageError(f"--resume: the checkpoint's class folders differ from the data's (only in the "
                             f"checkpoint: {only[0]}, only in the data: {only[1]}); resume with the data it started "
                             f"with{unicode_forms_note(saved, self.classes)}")

    def state(self) -> dict:
        # the model spec rebuilds the classifier without lomar's training code (lomar.load_model): a ViT, or a BEiT's
        # timm Beit (BEiTClassifier)
        return {"config": self.model.config.to_dict(), "num_classes": len(self.classes), "classes": self.classes,
                "settings": self.config.to_dict(), "format": FINETUNE_FORMAT,
                "global_pool": self.config.global_pool, "model_spec": model_spec(self.model)}


def _trained_classifier(config: FinetuneConfig, num_classes: int) -> tuple[VisionTransformer | Beit, int]:
    """--eval-only's classifier from its checkpoint as read once, rebuilt by the checkpoint reader that
    ``load_model`` uses, at --img-size (an absolute position table resampled from its trained grid) and --attention
    where given, and its trained size. UsageError in one line."""
    path = config.classifier.path
    attention = {} if config.attention == "auto" else {"attention": config.attention}
    try:
        reader, src = identify(path, config.classifier.take())
        beit = isinstance(reader, BEiTFinetuneReader)  # timm's Beit, at the size its relative position tables fix
        if not (beit or isinstance(reader, VitReader)):
            raise ValueError(f"it holds no ViT classifier (its weights are in the {reader.name} format)")
        model = reader.model(src, {} if beit else {"img_size": config.img_size, **attention})
        trained = model.config.img_size if beit else reader.trained_config(src).img_size
    except ValueError as exc:  # the reader's own words may name the file first
        raise UsageError(f"--pretrained {path}: {str(exc).removeprefix(f'{path}: ')}") from None
    if beit and attention:
        raise UsageError(f"--attention {config.attention}: {path} is a finetuned BEiT classifier, whose timm attention "
                         f"computes its relative position bias itself; drop --attention")
    if beit and trained != config.img_size:
        raise UsageError(f"--img-size {config.img_size}: {path} is a finetuned BEiT classifier, scored at its trained "
                         f"{trained} px (its relative position tables fix it); drop --img-size")
    if model.num_classes != num_classes:
        raise UsageError(f"--pretrained {path}: its head scores {model.num_classes} classes, not the {num_classes} "
                         f"it names")
    return model, trained


def finetune(config: FinetuneConfig) -> int:
    """Run (or resume) a finetuning, or with ``--eval-only`` score a finetuned classifier; the process exit code."""
    return evaluate_only(config) if config.eval_only else run(config, FinetuneTask)


def evaluate_only(config: FinetuneConfig) -> int:
    """Score ``--pretrained`` on the validation split in this process: a ``metrics.jsonl`` record in ``--out`` (the
    folder locked meanwhile)."""
    task, metrics, out = score_only(config, FinetuneTask)
    # as a run's evaluations print them: val_images, a dict, is for the record
    scores = ", ".join(metric_text(key, value) for key, value in metrics.items() if not isinstance(value, dict))
    over = over_note(task.val_loader.dataset.dataset.root, metrics)
    print(f"lomar finetune: {scores}{over}; {out / 'metrics.jsonl'}", flush=True)  # the command's result: stdout
    return 0
