"""The study's evaluations of one checkpoint, each through its `lomar` command, plus the
masked-reconstruction loss on held-out images (computed here: no command reports it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lomar.cli.study.spec import Cell, StudySpec
from lomar.errors import LomarError

__all__ = ["run_metric", "heldout_loss", "eval_img_size"]


def eval_img_size(spec: StudySpec, cell: Cell) -> int:
    if spec.eval.img_size:
        return spec.eval.img_size
    if "img_size" in cell.settings:
        return int(cell.settings["img_size"])
    return 224 if spec.data_pretrain else 96  # without --data, pretrain uses its demo preset's 96 px


def _flags(options: dict[str, Any]) -> list[str]:
    from lomar.cli.study.runner import settings_flags

    return settings_flags(options)


def run_metric(metric: str, spec: StudySpec, cell: Cell, checkpoint: Path, where: Path) -> float:
    """The metric's value for ``checkpoint``; its output is kept under ``where`` (a file stem/folder)."""
    from lomar.cli.study.runner import _last_line, lomar_command

    if metric == "heldout_loss":
        return heldout_loss(checkpoint, spec.data_val, eval_img_size(spec, cell), seed=cell.seed)
    where.parent.mkdir(parents=True, exist_ok=True)
    common = ["--train", spec.data_train, "--val", spec.data_val, "--img-size", str(eval_img_size(spec, cell)),
              "--workers", "0"]
    if metric in ("knn", "linprobe"):
        result = where.with_suffix(".json")
        tmp = where.with_name(f".{where.name}.tmp.json")
        options = dict(spec.eval.knn if metric == "knn" else {"seed": cell.seed, **spec.eval.linprobe})
        argv = [metric, str(checkpoint), *common, "--json", str(tmp), *_flags(options)]
        rc, text = lomar_command(argv)
        if rc != 0:
            raise LomarError(f"`lomar {metric}` failed on {checkpoint}: {_last_line(text)}")
        os.replace(tmp, result)  # the value is on record only once whole
        return round(json.loads(result.read_text())[f"{metric}_top1"], 4)
    if metric == "finetune":
        options = {"seed": cell.seed, **spec.eval.finetune}
        argv = ["finetune", "--pretrained", str(checkpoint), *common, "--out", str(where), "--resume", "auto",
                *_flags(options)]
        rc, text = lomar_command(argv)
        if rc != 0:
            raise LomarError(f"`lomar finetune` failed on {checkpoint}: {_last_line(text)}")
        records = [json.loads(ln) for ln in (where / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        scored = [r for r in records if "top1" in r]
        if not scored:
            raise LomarError(f"`lomar finetune` wrote no top-1 into {where / 'metrics.jsonl'}")
        _check_finished(scored[-1], options, where)
        return round(scored[-1]["top1"], 4)  # the last epoch, not the best: no selection on val
    raise ValueError(f"unknown metric {metric}")


def _check_finished(last: dict, options: dict, where: Path) -> None:
    """A finetune that a signal stopped exits 0 with a checkpoint and no record of the epoch it
    was in: the last record is then an earlier epoch's, not the result."""
    from lomar.cli.study.runner import StudyStopped
    from lomar.train.finetune_config import FinetuneConfig

    if options.get("max_steps"):
        done = last["step"] >= int(options["max_steps"])
    else:
        done = not last.get("partial") and last["epoch"] == int(options.get("epochs", FinetuneConfig.epochs)) - 1
    if not done:
        raise StudyStopped(f"finetuning in {where} stopped at epoch {last['epoch']}, step {last['step']} (signal); "
                           f"re-run the same command to continue")


@torch.no_grad()
def heldout_loss(checkpoint: Path, val_root: str, img_size: int, seed: int = 0, batch_size: int = 128) -> float:
    """Mean masked-reconstruction loss (the training objective, same masks for every model of a
    seed) on the held-out images: centre crops, as the evaluations see them."""
    from torchvision.datasets import ImageFolder

    from lomar.checkpoints.io import safe_load
    from lomar.eval.features import eval_transform
    from lomar.train.config import PretrainConfig, build_model

    ckpt = safe_load(checkpoint)
    known = PretrainConfig.__dataclass_fields__
    config = PretrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    model = build_model(config)
    model.load_state_dict(ckpt["model"])
    model.eval()
    dataset = ImageFolder(val_root, transform=eval_transform(img_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for images, _ in loader:
        loss = model(images, generator=gen).loss
        total, count = total + float(loss) * len(images), count + len(images)
    return round(total / max(count, 1), 4)
