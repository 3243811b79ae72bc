"""Frozen-encoder evaluation: loading a pretrained encoder, features, k-NN, linear probe."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_original, safe_load
from .export import CONFIG_NAME, create_encoder
from .vit import ViTConfig, VisionTransformer

__all__ = ["load_pretrained_encoder", "extract_features", "knn_predict", "knn_accuracy",
           "train_linear_probe", "LinearProbe"]


def _encoder_from_pretrain_checkpoint(ckpt: dict, num_classes: int) -> VisionTransformer:
    from .config import PretrainConfig, vit_config

    known = set(PretrainConfig.__dataclass_fields__)
    config = PretrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    encoder = VisionTransformer(vit_config(config), num_classes=num_classes)
    state = {k.removeprefix("encoder."): v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    allowed = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    if unexpected or set(missing) - allowed:
        raise ValueError(f"pretrained encoder does not fit: missing {sorted(set(missing) - allowed)}, "
                         f"unexpected {sorted(unexpected)}")
    return encoder


def load_pretrained_encoder(path: str | Path, num_classes: int = 0, **overrides) -> VisionTransformer:
    """An encoder (optionally with a fresh classifier head) from any pretrained source:

    - our pretraining checkpoint (``last.pt``: ``model`` + ``config``),
    - a directory written by ``lomar export`` (``config.json`` + safetensors),
    - an original LoMaR / MAE checkpoint (its pixel head, mask token and decoder are dropped).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} is a folder without {CONFIG_NAME}; pass a checkpoint or an exported folder")
        return create_encoder(path, num_classes=num_classes, **overrides)
    ckpt = safe_load(path)
    if "config" in ckpt and isinstance(ckpt.get("model"), dict):
        return _encoder_from_pretrain_checkpoint(ckpt, num_classes)
    model = load_original(path, **overrides)
    encoder = model.encoder if hasattr(model, "encoder") else model
    if num_classes:
        fresh = VisionTransformer(encoder.config, num_classes=num_classes)
        fresh.load_state_dict(encoder.state_dict(), strict=False)
        encoder = fresh
    return encoder


@torch.no_grad()
def extract_features(encoder: VisionTransformer, loader, device: torch.device | str = "cpu"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled, normed patch tokens of every image: (N, D) features, (N,) labels.

    LoMaR's cls token is never trained to summarise an image (each sequence only
    reconstructs its own window), so the mean of the patch tokens is the feature.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for images, targets in loader:
        tokens = encoder.forward_features(images.to(device))
        feats.append(tokens[:, 1:].mean(dim=1).float().cpu())
        labels.append(targets.cpu())
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Cosine k-NN with exp(sim / T)-weighted votes: (Q, D) queries -> (Q, C) class scores."""
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, query.shape[0], chunk):
        q = F.normalize(query[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(encoder: VisionTransformer, train_loader, val_loader, k: int = 20, temperature: float = 0.07,
                 device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy in [0, 1] of a k-NN classifier on frozen features, train -> val."""
    train_x, train_y = extract_features(encoder, train_loader, device)
    val_x, val_y = extract_features(encoder, val_loader, device)
    classes = int(max(train_y.max(), val_y.max())) + 1
    pred = knn_predict(train_x, train_y, val_x, classes, k, temperature).argmax(dim=1)
    return float((pred == val_y).float().mean())


class LinearProbe(nn.Module):
    """BatchNorm without affine parameters + a linear layer, on frozen features (as in MAE)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                       epochs: int = 100, batch_size: int = 256, lr: float = 1e-2, weight_decay: float = 0.0,
                       seed: int = 0) -> tuple[LinearProbe, float]:
    """Train the probe on precomputed features (AdamW, cosine lr); returns (probe, val top-1).

    MAE trains its probe with LARS at a very large batch; on cached features, AdamW with a
    cosine schedule reaches the same optimum of this convex problem at small scale.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classes = int(max(train_y.max(), val_y.max())) + 1
    probe = LinearProbe(train_x.shape[1], classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, -(-train_x.shape[0] // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(train_x.shape[0], generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    probe.eval()
    with torch.no_grad():
        accuracy = float((probe(val_x).argmax(1) == val_y).float().mean())
    return probe, accuracy
