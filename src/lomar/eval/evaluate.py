"""Frozen-encoder evaluation: loading a pretrained encoder, features, k-NN, linear probe.

Everything here works on plain ``(images, labels)`` loaders, so the pretraining engine can
call :func:`knn_accuracy` every few epochs (``--knn-every``) with :func:`knn_loaders`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lomar.models.vit import ViTConfig, VisionTransformer

__all__ = ["LoadReport", "load_pretrained_encoder", "eval_transform", "knn_loaders", "extract_features",
           "knn_predict", "knn_accuracy", "KnnMonitor", "LinearProbe", "train_linear_probe", "write_json"]

Pool = Literal["mean", "cls"]
# Keys of a classifier on top of the encoder: new (and randomly initialised) when finetuning.
_CLASSIFIER = ("head.", "fc_norm.")


@dataclass
class LoadReport:
    """What :func:`load_pretrained_encoder` took, left out and initialised afresh."""

    source: str  # "pretrain checkpoint (lomar)", "exported folder", "original checkpoint (mae)", ...
    path: str
    loaded: int = 0  # tensors copied into the encoder
    fresh: list[str] = field(default_factory=list)  # encoder keys not in the source (new head)
    dropped: list[str] = field(default_factory=list)  # source keys the encoder does not use
    notes: list[str] = field(default_factory=list)  # e.g. interpolated position table

    def summary(self) -> str:
        def short(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "") if keys else "none"

        text = (f"loaded {self.loaded} tensors from {self.source} {self.path}; "
                f"newly initialised: {short(self.fresh)}; not used: {short(self.dropped)}")
        return text + "".join(f"; {note}" for note in self.notes)


def _from_pretrain_checkpoint(ckpt: dict) -> tuple[ViTConfig, dict, list[str], str]:
    """Our ``lomar pretrain`` checkpoint: the LoMaR / MAE state dict's ``encoder.*`` keys."""
    from lomar.train.config import PretrainConfig, vit_config

    known = set(PretrainConfig.__dataclass_fields__)
    config = PretrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    state = {k.removeprefix("encoder."): v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    dropped = [k for k in ckpt["model"] if not k.startswith("encoder.")]  # mask token, pixel head, decoder
    return vit_config(config), state, dropped, f"pretrain checkpoint ({config.method})"


def _from_original(ckpt: dict, num_heads: int | None) -> tuple[ViTConfig, dict, list[str], str]:
    """A checkpoint of the original LoMaR / MAE code (pretraining or finetuned)."""
    from lomar.checkpoints.io import infer_original_config, lomar_from_original

    # Window size and decoder heads only matter for pretraining: dummies that always fit keep
    # inference from failing on settings the encoder does not have.
    hints = {"window_size": 1, "decoder_num_heads": 1, **({"num_heads": num_heads} if num_heads else {})}
    method, settings = infer_original_config(ckpt, **hints)
    state = ckpt.get("model", ckpt)
    if method == "lomar":
        state = {k: v for k, v in lomar_from_original(state, keep_pos_embed=True).items()}
        mine = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        dropped = [k for k in state if not k.startswith("encoder.")]
        if settings["config"].pos == "rpe":  # SPEC §6.3: the stored sin-cos table is never used
            dropped += [k for k in mine if k == "pos_embed"]
            mine.pop("pos_embed", None)
        return settings["config"], mine, dropped, "original checkpoint (lomar)"
    encoder = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.", *_CLASSIFIER)
    mine = {k: v for k, v in state.items() if k.startswith(encoder)}
    return settings["config"], mine, [k for k in state if k not in mine], f"original checkpoint ({method})"


def _read_source(path: Path, num_heads: int | None = None) -> tuple[ViTConfig, dict, list[str], str]:
    from lomar.checkpoints.io import safe_load
    from lomar.checkpoints.export import CONFIG_NAME, create_encoder

    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} is a folder without {CONFIG_NAME}; pass a checkpoint file or a folder "
                             f"written by `lomar export` / `lomar pretrain`")
        encoder = create_encoder(path)
        return encoder.config, encoder.state_dict(), [], "exported folder"
    ckpt = safe_load(path)
    config = ckpt.get("config")
    if isinstance(config, dict) and isinstance(ckpt.get("model"), dict):
        if "method" in config:
            return _from_pretrain_checkpoint(ckpt)
        # ``lomar finetune`` checkpoints: a VisionTransformer state with its ViTConfig.
        return ViTConfig.from_dict(config), ckpt["model"], [], "finetune checkpoint"
    return _from_original(ckpt, num_heads)


def _resize_pos_embed(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of an absolute table (1, 1+h·w, D) to ``grid``; cls row kept."""
    side = int(round((table.shape[1] - 1) ** 0.5))
    spatial = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    spatial = F.interpolate(spatial, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], spatial.permute(0, 2, 3, 1).flatten(1, 2).to(table.dtype)], dim=1)


def load_pretrained_encoder(path: str | Path, num_classes: int = 0, **overrides) -> VisionTransformer:
    """An encoder, optionally with a new classifier head, from anything pretrained.

    ``path``: our ``lomar pretrain`` checkpoint (``last.pt``: ``model`` + ``config``; its
    ``encoder.*`` keys), a ``lomar finetune`` checkpoint, a folder written by ``lomar export``
    (or a pretraining run folder, which holds ``config.json`` + ``encoder.safetensors``),
    or an original LoMaR / MAE checkpoint. The pretraining pixel head, mask token, decoder
    and LoMaR's unused ``pos_embed`` are dropped (SPEC §3). ``overrides`` change the
    architecture's free settings (``img_size``, ``drop_path``); an absolute position table
    is interpolated to a new ``img_size``. ``num_classes > 0`` adds ``fc_norm`` + ``head``,
    freshly initialised unless the source holds a head of the same size.

    Loading is strict about the encoder (any missing or misshapen encoder weight is an
    error naming it) and non-strict only for the classifier. The returned module carries
    ``load_report`` (:class:`LoadReport`) saying what was loaded, new and dropped.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a checkpoint file or an exported folder")
    config, state, dropped, source = _read_source(path, overrides.get("num_heads"))
    unknown = sorted(set(overrides) - set(ViTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown encoder setting(s) {', '.join(unknown)}")
    config = replace(config, **overrides)
    model = VisionTransformer(config, num_classes=num_classes)
    report = LoadReport(source, str(path), dropped=list(dropped))
    own = model.state_dict()
    state = dict(state)
    # A finetuned classifier has no final norm (it pools into fc_norm): as a plain encoder
    # it gets a fresh, identity-initialised one.
    from_classifier = any(k.startswith("fc_norm.") for k in state)
    for key in [k for k in state if k.startswith(_CLASSIFIER)]:
        if key not in own or own[key].shape != state[key].shape:  # another task's head
            report.dropped.append(key)
            del state[key]
    if num_classes:  # a classifier pools un-normed tokens into fc_norm: the final norm goes unused
        for key in [k for k in state if k.startswith("norm.")]:
            report.dropped.append(key)
            del state[key]
    if "pos_embed" in state:
        if model.pos_embed is None:  # e.g. an abs-trained table offered to an RPE encoder
            report.dropped.append("pos_embed")
            del state["pos_embed"]
        elif state["pos_embed"].shape != own["pos_embed"].shape:
            state["pos_embed"] = _resize_pos_embed(state["pos_embed"], model.grid)
            report.notes.append(f"position table interpolated to the {model.grid[0]}x{model.grid[1]} grid")
    bad_shapes = [k for k in state if k in own and state[k].shape != own[k].shape]
    if bad_shapes:
        k = bad_shapes[0]
        raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)} but the encoder expects "
                         f"{tuple(own[k].shape)}; the overrides do not fit these weights")
    missing, unexpected = model.load_state_dict(state, strict=False)
    not_classifier = [k for k in missing if not k.startswith(_CLASSIFIER)
                      and not (from_classifier and k.startswith("norm."))]
    if not_classifier or unexpected:
        raise ValueError(f"{path} does not hold a complete encoder for {config}: missing "
                         f"{not_classifier or 'nothing'}, unexpected {unexpected or 'nothing'}")
    report.loaded, report.fresh = len(state), list(missing)
    model.load_report = report
    return model


# ---- features --------------------------------------------------------------------


def eval_transform(img_size: int):
    """Resize the short side to img_size/0.875 (bicubic), centre-crop, ImageNet-normalise."""
    from torchvision.transforms import v2

    from lomar.data.images import IMAGENET_MEAN, IMAGENET_STD

    return v2.Compose([v2.ToImage(), v2.RGB(),
                       v2.Resize(int(round(img_size / 0.875)), interpolation=v2.InterpolationMode.BICUBIC,
                                 antialias=True),
                       v2.CenterCrop(img_size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def knn_loaders(train: str | Path, val: str | Path | None = None, img_size: int = 224, batch_size: int = 128,
                workers: int = 4) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders of ImageFolder splits with :func:`eval_transform`, unshuffled.

    ``train`` alone is a root holding ``train/`` and ``val/``. Raises ValueError naming a
    missing split or a class mismatch.
    """
    from torchvision.datasets import ImageFolder

    roots = (Path(train), Path(val)) if val is not None else (Path(train) / "train", Path(train) / "val")
    for root in roots:
        if not root.is_dir():
            raise ValueError(f"{root} is not a folder of class folders (ImageFolder layout: ROOT/CLASS/IMAGE)")
    sets = [ImageFolder(str(root), eval_transform(img_size)) for root in roots]
    if sets[0].classes != sets[1].classes:
        raise ValueError(f"train and val class folders differ: {sets[0].classes} vs {sets[1].classes}")
    return tuple(DataLoader(s, batch_size, shuffle=False, num_workers=workers) for s in sets)  # type: ignore


@torch.no_grad()
def extract_features(encoder: VisionTransformer, loader, device: torch.device | str = "cpu",
                     pool: Pool = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every image: (N, D) float32 on CPU, and (N,) labels.

    ``pool='mean'`` (default) averages the normed patch tokens; ``'cls'`` takes the normed
    cls token. LoMaR never gives the cls token a summarising role (each sequence only
    reconstructs its own window, and the cls output is dropped), so the mean is the fair
    feature for both methods; MAE's own linear probe reads the cls token.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for images, targets in loader:
            tokens = encoder.forward_features(images.to(device, non_blocking=True))  # (B, 1+L, D)
            feats.append((tokens[:, 1:].mean(dim=1) if pool == "mean" else tokens[:, 0]).float().cpu())
            labels.append(torch.as_tensor(targets).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Cosine k-NN with exp(sim / T)-weighted votes (InstDisc / DINO): class scores (Q, C).

    train_feats (M, D), train_labels (M,) in [0, C), query (Q, D); computed on the device of
    ``train_feats``, ``chunk`` queries at a time so memory stays O(chunk · M).
    """
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(bank.device)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, query.shape[0], chunk):
        q = F.normalize(query[start:start + chunk].to(bank.device).float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(encoder: VisionTransformer, train_loader, val_loader, k: int = 20, temperature: float = 0.07,
                 device: torch.device | str = "cpu", pool: Pool = "mean") -> float:
    """Top-1 in [0, 1] of a k-NN classifier on frozen features, train -> val.

    Leaves the encoder in the train/eval mode it had. Call it on one process only.
    """
    train_x, train_y = extract_features(encoder, train_loader, device, pool)
    val_x, val_y = extract_features(encoder, val_loader, device, pool)
    classes = int(max(train_y.max(), val_y.max())) + 1
    dev = torch.device(device)
    pred = knn_predict(train_x.to(dev), train_y, val_x, classes, k, temperature).argmax(dim=1).cpu()
    return float((pred == val_y).float().mean())


class KnnMonitor:
    """k-NN top-1 of an encoder on a fixed ImageFolder root, for ``pretrain --knn-every N``.

    Build it once (on the main process; it checks the folders at once and raises ValueError
    naming what is wrong), then call it with the encoder whenever a score is wanted.
    """

    def __init__(self, root: str | Path, img_size: int, batch_size: int = 128, workers: int = 2,
                 k: int = 20, temperature: float = 0.07):
        self.loaders = knn_loaders(root, img_size=img_size, batch_size=batch_size, workers=workers)
        self.k, self.temperature = k, temperature

    def __call__(self, encoder: VisionTransformer, device: torch.device | str = "cpu") -> float:
        return knn_accuracy(encoder, *self.loaders, k=self.k, temperature=self.temperature, device=device)


# ---- linear probe ------------------------------------------------------------------


class LinearProbe(nn.Module):
    """BatchNorm without affine parameters + a linear layer on frozen features (as in MAE)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> logits (B, C)."""
        return self.linear(self.norm(features))


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                       epochs: int = 90, batch_size: int = 256, lr: float = 1e-2, weight_decay: float = 0.0,
                       seed: int = 0) -> tuple[LinearProbe, float]:
    """Train the probe on cached features; returns (probe, val top-1 in [0, 1]).

    MAE trains its probe with LARS at batch 16384 through the frozen encoder with light
    augmentation. Here features are computed once (centre crops) and the probe, a convex
    problem, is trained with AdamW and a per-step cosine schedule: same model, orders of
    magnitude cheaper, slightly lower numbers than with augmentation.
    """
    if train_x.shape[0] < 2:
        raise ValueError("the linear probe needs at least 2 training images (BatchNorm statistics)")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classes = int(max(train_y.max(), val_y.max())) + 1
    probe = LinearProbe(train_x.shape[1], classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = max(1, train_x.shape[0] // batch_size)
    total = epochs * per_epoch
    probe.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(train_x.shape[0], generator=gen)
        # Equal batches (the ragged tail joins the last one): BatchNorm needs > 1 sample.
        for idx in order.tensor_split(per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    probe.eval()
    with torch.no_grad():
        accuracy = float((probe(val_x).argmax(1) == val_y).float().mean())
    return probe, accuracy


def write_json(path: str | Path | None, result: dict) -> None:
    """Write a result dict as indented JSON when a path is given."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
