"""The study's evaluations of one checkpoint, as library calls that return their numbers.

A spec's ``eval.knn``/``linprobe``/``finetune`` options go through that command's own flags (its
defaults and bounds); the numbers come from :mod:`lomar.eval`, the finetuning run's metrics.jsonl,
and the held-out masked-reconstruction loss computed here."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import torch

from lomar.checkpoints.file_names import LAST, METRICS
from lomar.checkpoints.formats import load_model
from lomar.cli.common import resolve_device
from lomar.cli.probe import (
    fit_linprobe,
    frozen_features,
    knn_add_arguments,
    linprobe_add_arguments,
    resolve_linprobe,
)
from lomar.cli.study.flags import parse_flags, settings_flags
from lomar.cli.study.spec import (
    Cell,
    StudyFailed,
    StudySpec,
    StudyStopped,
    stop_signals_seen,
)
from lomar.data.collate import collate_labelled
from lomar.data.folder import LabelledImageFolder
from lomar.errors import LomarError, UsageError
from lomar.eval.features import eval_transform
from lomar.eval.knn import knn_top1
from lomar.models.lomar import LoMaR
from lomar.models.mae import MAE
from lomar.train.finetune import finetune
from lomar.train.finetune_config import add_finetune_arguments, resolve_finetune_config
from lomar.train.monitor import read_records
from lomar.train.run_state import SaveError
from lomar.train.settings import ConfigError
from lomar.train.task import TrainingError
from lomar.values import counted

__all__ = ["Scorer", "check_options", "heldout_loss", "eval_img_size"]


def eval_img_size(spec: StudySpec, cell: Cell) -> int:
    # without data, pretrain uses its demo preset's 96 px
    return spec.eval.img_size or int(cell.settings.get("img_size", 224 if spec.data_pretrain else 96))


def _args(metric: str, spec: StudySpec, cell: Cell, checkpoint: Path, where: Path):
    """The evaluation's settings as its command (``lomar knn``, ``linprobe``, ``finetune``) reads them."""
    argv = ["--pretrained", str(checkpoint), "--train", str(spec.data_train), "--val", str(spec.data_val),
            "--img-size", str(eval_img_size(spec, cell)), "--workers", "0"]
    if metric == "finetune":
        argv += ["--out", str(where), "--resume", "auto"]
    options = spec.eval.knn if metric == "knn" else {"seed": cell.seed, **getattr(spec.eval, metric)}
    add = {"knn": knn_add_arguments, "linprobe": linprobe_add_arguments, "finetune": add_finetune_arguments}[metric]
    args = parse_flags(add, argv + settings_flags(options))
    args.command = metric  # as the command line's parser sets it: frozen_features names it in an error's words
    if metric == "linprobe":
        resolve_linprobe(args)
    return args


def check_options(spec: StudySpec) -> None:
    """Each evaluation's options parse as its command's flags, and its data holds images (for the labelled ones: two
    classes, and data.train and data.val paired by the class-folder rule, LabelledImageFolder.match_classes); else a
    UsageError naming them. Checked before any cell trains, not at its first score."""
    labelled = set(spec.eval.metrics) - {"heldout_loss"}
    read = ("train", "val") if labelled else ("val",) if spec.eval.metrics else ()  # what the metrics read
    folders: dict[str, LabelledImageFolder] = {}
    for split in read:
        try:
            folders[split] = LabelledImageFolder(getattr(spec, f"data_{split}"))
            if split == "train":  # read by the labelled metrics alone
                folders[split].check_classes()
        except ValueError as exc:
            raise UsageError(f"data.{split}: {exc}") from None
    # the class-folder rule of finetune, knn and linprobe, with their check of a training class's images
    # (LabelledImageFolder's default, lomar.data.decode_check: a JPEG at 1/8), whatever decode the spec's evaluations
    # read with: else refused at the first score, after a cell
    if labelled:
        try:
            folders["train"].match_classes(folders["val"])
        except ValueError as exc:
            raise UsageError(f"data.train, data.val: {exc}") from None
    train_images = len(folders["train"]) if labelled else 0
    cell = Cell({}, dict(spec.settings), spec.seeds[0])
    for metric in set(spec.eval.metrics) - {"heldout_loss"}:
        try:
            args = _args(metric, spec, cell, Path(LAST), Path("/nonexistent-study-check/finetune"))
            if metric == "finetune":  # its bounds (epochs > 0, ...) are the config's: as --print-config reads them
                args.print_config = True
                config = resolve_finetune_config(args)
        except UsageError as exc:
            raise UsageError(f"eval.{metric}: {exc}; fix the spec's eval.{metric} options") from None
        if metric == "finetune" and train_images < (step := config.batch_size * config.accum_steps):
            # finetune's loader leaves a short last batch out, so no step: else seen at the first score, after a cell
            raise UsageError(f"eval.finetune: data.train's {counted(train_images, 'image')} cannot fill one step of "
                             f"batch {config.batch_size} x accum {config.accum_steps}; give eval.finetune a batch_size "
                             f"x accum_steps of {train_images} or less, or data.train {step} images")


class Scorer:
    """``Scorer(spec, cell, checkpoint, where)(metric)``: the metric's value for the checkpoint
    (outputs under ``where``). The k-NN and the linear probe share one pass of features. A note not in ``said``
    (the study's notes so far) is said and added to it."""

    def __init__(self, spec: StudySpec, cell: Cell, checkpoint: Path, where: Path, said: dict | None = None):
        self.spec, self.cell, self.checkpoint, self.where = spec, cell, checkpoint, where
        self.said: dict[str, None] = {} if said is None else said
        self._features: dict[tuple, tuple[torch.Tensor, ...]] = {}  # (train_x, train_y, val_x, val_y) a key

    def __call__(self, metric: str) -> float | None:
        if metric == "heldout_loss":
            return heldout_loss(self.checkpoint, self.spec.data_val, eval_img_size(self.spec, self.cell),
                                seed=self.cell.seed)
        args = _args(metric, self.spec, self.cell, self.checkpoint, self.where.with_name(f"{self.where.name}-finetune"))
        if metric == "finetune":
            return _finetune(args, self.said)
        key = (args.img_size, args.pool, args.batch_size, args.device, args.decode)
        try:
            if key not in self._features:
                self._features[key] = frozen_features(args).features
            if metric == "knn":
                return round(knn_top1(*self._features[key], args.k, args.temperature,
                                      device=resolve_device(args.device)), 4)
            return round(fit_linprobe(args, self._features[key])[1], 4)
        except ValueError as exc:
            raise LomarError(f"{metric} of {self.checkpoint}: {exc}") from None


def _finetune(args, said: dict[str, None]) -> float:
    """Finetune (or continue finetuning) into ``args.out``; the last epoch's top-1 from its metrics.jsonl. Its notes
    not in ``said`` are said and added: once a study, not at each cell's evaluation."""
    try:
        with contextlib.redirect_stderr(io.StringIO()) as notes:
            config, where = resolve_finetune_config(args), Path(args.out)
    except ConfigError as exc:
        raise UsageError(f"eval.finetune: {exc}") from None
    new = [note for note in notes.getvalue().splitlines() if note not in said]
    sys.stderr.write("".join(f"{note}\n" for note in new))
    said.update(dict.fromkeys(new))
    config.notes_said = said  # the notes of its start (an encoder flag the cells' encoders lack): once a study
    config.notes_new_run = False  # the study passes --resume auto itself
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), stop_signals_seen() as signals:
        try:
            rc = finetune(config)  # its errors still reach stderr
        except (TrainingError, SaveError) as exc:  # what `lomar finetune` reports in one line, not a traceback
            raise StudyFailed(f"finetuning in {where} failed: {exc}") from None
    if rc == 130 or signals:
        raise StudyStopped(f"finetuning in {where} was interrupted; re-run the same command to continue", signals)
    if rc != 0:
        raise StudyFailed(f"finetuning in {where} failed (exit code {rc}; its error is above)")
    path = where / METRICS
    scored = [r for r in read_records(path) if "top1" in r]
    if not scored:
        raise LomarError(f"finetuning wrote no top-1 into {path}")
    _check_finished(scored[-1], {"max_steps": config.max_steps, "epochs": config.epochs}, where)
    return round(scored[-1]["top1"], 4)  # the last epoch, not the best: no selection on val


def _check_finished(last: dict, options: dict, where: Path) -> None:
    """A finetune that a signal stopped exits 0 with a checkpoint and no record of the epoch it
    was in: the last record is then an earlier epoch's, not the result."""
    if not (last["step"] >= int(options["max_steps"]) if options.get("max_steps") else
            not last.get("partial") and last["epoch"] == int(options["epochs"]) - 1):
        raise StudyStopped(f"finetuning in {where} stopped at epoch {last['epoch']}, step {last['step']} (signal); "
                           f"re-run the same command to continue")


@torch.no_grad()
def heldout_loss(checkpoint: Path, val_root: str, img_size: int, seed: int = 0,
                 batch_size: int = 128) -> float | None:
    """Mean masked-reconstruction loss (the training objective, same masks for every model of a
    seed) on the held-out images: centre crops, as the evaluations see them. The images are read as
    the k-NN and the probes read them (:class:`LabelledImageFolder`): empty class folders are fine,
    unreadable images are skipped. None for a BEiT (shown as '–')."""
    try:
        images = LabelledImageFolder(val_root, eval_transform(img_size))
    except ValueError as exc:
        raise LomarError(f"heldout_loss: {exc}; set data.val to a folder of class folders with images") from None
    model = load_model(checkpoint).eval()
    if not isinstance(model, (LoMaR, MAE)):  # BEiT predicts visual tokens: it has no pixel loss to stand beside these
        return None
    loader = torch.utils.data.DataLoader(images, batch_size, collate_fn=collate_labelled)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch, _ in loader:
        if len(batch):  # a batch of unreadable images only is empty
            total, count = total + float(model(batch, generator=gen).loss) * len(batch), count + len(batch)
    if not count:
        raise LomarError(f"heldout_loss: no image of {val_root} could be read; set data.val to readable images")
    return round(total / count, 4)
