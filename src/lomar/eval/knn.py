"""k-NN classification on frozen features (weighted votes, as in InstDisc / DINO)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lomar.data.classify import eval_resize
from lomar.data.small_images import SmallImages
from lomar.errors import first_on_machine
from lomar.eval.features import Pool, extract_features, knn_loaders
from lomar.eval.knn_shared import share_loader, shared_features
from lomar.models.vit import VisionTransformer

__all__ = ["knn_predict", "scoring_device", "knn_top1", "knn_accuracy", "KnnMonitor"]

log = logging.getLogger("lomar.eval")

# Bytes of one block of query-bank similarities: 1,024 queries against ImageNet's 1.28M training features would
# be 5.2 GB beside the bank; this keeps blocks of 1,024 queries up to a bank of 262,144 (209 at ImageNet's).
SIMILARITY_BYTES = 2**30
# Bytes of bank rows normalised at a time: a whole normalised copy of ImageNet's ViT-B bank was 3.9 GB beside it.
BANK_BLOCK_BYTES = 2**25
# Fewest bank rows a block multiplies: MKL rounded some similarities of 8- and 16-row blocks 1 ulp away from the
# whole product's (measured; 32 rows and more matched bit for bit), which would move ties at the k-th neighbour.
MIN_BLOCK_ROWS = 64
# DINO's k-NN evaluation: 20 neighbours, votes weighed exp(cosine / 0.07); pretrain --knn-every scores with these.
DINO_K, DINO_TEMPERATURE = 20, 0.07


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor,
                num_classes: int, k: int = DINO_K, temperature: float = DINO_TEMPERATURE, chunk: int | None = None,
                max_bytes: int = SIMILARITY_BYTES, block_bytes: int | None = None) -> torch.Tensor:
    """Cosine k-NN with exp(sim / T)-weighted votes (InstDisc / DINO): class scores (Q, C), each query's divided
    by its nearest neighbour's weight exp(max sim / T): the same ratios, but float32's exp overflows past 88, so
    unscaled votes at T = 0.01 could be inf for several classes, and argmax then picked the first of them.

    train_feats (M, D), train_labels (M,) in [0, C), query (Q, D); computed on the device of
    ``train_feats``, ``chunk`` queries at a time (default: as many as keep their (chunk, M) similarities
    within ``max_bytes``, at most 1,024). Each query's top k is taken over its whole row of similarities, so
    the chunk decides no tie at the k-th neighbour (the matrix product may round a block of under 8 rows in
    another order: BLAS's small-size kernels). The bank is normalised ``block_bytes`` of rows at a time (default
    :data:`BANK_BLOCK_BYTES`; :func:`_similarities`), never whole.
    """
    bank = train_feats.float()
    # F.normalize's own denominators, once: each block divided by them is F.normalize's output bit for bit
    denominators = bank.norm(2.0, 1, keepdim=True).clamp_min(1e-12)
    rows = _block_rows(bank, block_bytes)
    labels = train_labels.to(bank.device)
    k = min(k, bank.shape[0])
    if chunk is None:
        chunk = max(1, min(1024, max_bytes // (4 * max(1, bank.shape[0]))))
    scores = []
    for start in range(0, query.shape[0], chunk):
        q = F.normalize(query[start:start + chunk].to(bank.device).float(), dim=1)
        sim, idx = _similarities(q, bank, denominators, rows).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[idx], ((sim - sim[:, :1]) / temperature).exp())  # topk: the max first
        scores.append(votes)
    return torch.cat(scores)


def _block_rows(bank: torch.Tensor, block_bytes: int | None = None) -> int:
    """Bank rows (M, D) normalised at a time: ``block_bytes`` of float32 rows, at least :data:`MIN_BLOCK_ROWS`."""
    return max(MIN_BLOCK_ROWS, (block_bytes or BANK_BLOCK_BYTES) // (4 * max(1, bank.shape[1])))


def _similarities(q: torch.Tensor, bank: torch.Tensor, denominators: torch.Tensor, rows: int) -> torch.Tensor:
    """``q @ F.normalize(bank).T`` (Q, M) without the normalised bank (bit for bit with MKL on the CPU, as measured;
    cuBLAS may pick other kernels for narrower products, untested: a tie at the k-th neighbour could then move by an
    ulp): blocks of ``rows`` bank rows divided by their ``denominators`` just in time. The last block takes the
    remainder, so none is narrower than ``rows`` (or the bank), whose products BLAS would round in another order."""
    sim = torch.empty(q.shape[0], bank.shape[0], device=q.device)
    blocks = max(1, bank.shape[0] // rows)
    unit = torch.empty(min(2 * rows, bank.shape[0]), bank.shape[1], device=q.device)
    for i in range(blocks):
        start, end = i * rows, bank.shape[0] if i == blocks - 1 else (i + 1) * rows
        block = torch.div(bank[start:end], denominators[start:end], out=unit[:end - start])
        torch.mm(q, block.T, out=sim[:, start:end])  # no (Q, rows) copy
    return sim


def scoring_device(bank: torch.Tensor, device: torch.device | str) -> torch.device:
    """Where to score against ``bank`` (M, D): ``device``, unless it is a CUDA device without the free memory for the
    float32 bank and a block of similarities beside it (ImageNet's ViT-B bank is 3.9 GB): then the CPU, which
    is slower but holds it (a k-NN score is worth more than the minutes it saves), with a warning saying so."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    (count, dim), rows = bank.shape, 2 * _block_rows(bank)  # the last block: up to twice as many rows
    # the float32 bank, its norms, a normalised block of it and the similarities
    need = 4 * (count * dim + count + min(count, rows) * dim) + SIMILARITY_BYTES
    # what the card has free, and what this process's allocator holds unused (a training run's cache, at --knn-every)
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if free >= need:
        return device
    log.warning("k-NN scores on the CPU: %s has %.1f GiB free, the bank of %d features needs %.1f GiB", device,
                free / 2**30, bank.shape[0], need / 2**30)
    return torch.device("cpu")


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, k: int = DINO_K,
             temperature: float = DINO_TEMPERATURE, device: torch.device | str = "cpu") -> float:
    """Top-1 in [0, 1] of the k-NN classifier on features: train_x (M, D), train_y (M,), val_x (Q, D), val_y (Q,);
    scored on ``device`` where the bank fits (:func:`scoring_device`)."""
    classes = int(max(train_y.max(), val_y.max())) + 1
    bank = train_x.to(scoring_device(train_x, device))
    pred = knn_predict(bank, train_y, val_x, classes, k, temperature).argmax(dim=1).cpu()
    # hits / queries in one float64 division: 3 of 10 is 0.3, not float32's mean 0.30000001192092896
    return int((pred == val_y).sum()) / len(val_y)


def knn_accuracy(encoder: VisionTransformer, train_loader, val_loader, k: int = DINO_K,
                 temperature: float = DINO_TEMPERATURE, device: torch.device | str = "cpu",
                 pool: Pool = "mean", small: tuple[SmallImages | None, SmallImages | None] = (None, None)) -> float:
    """Top-1 in [0, 1] of a k-NN classifier on frozen features, train -> val; ``small``: where given, the train and
    val images smaller than its size counted (:func:`~lomar.eval.features.extract_features`).

    Leaves the encoder in the train/eval mode it had. Call it on one process only.
    """
    train_x, train_y = extract_features(encoder, train_loader, device, pool, desc="k-NN train features",
                                        small=small[0])
    val_x, val_y = extract_features(encoder, val_loader, device, pool, desc="k-NN val features", small=small[1])
    return knn_top1(train_x, train_y, val_x, val_y, k, temperature, device)


class KnnMonitor:
    """k-NN top-1 of an encoder on a fixed ImageFolder root, for ``pretrain --knn-every N``.

    Build it once (it checks the folders at once and raises ValueError naming what is wrong), then call it with the
    encoder whenever a score is wanted. ``decode``: full or draft, as :func:`~lomar.eval.features.knn_loaders`
    reads it. Under torchrun (``world_size`` > 1) build and call it on every process: each extracts its share of
    the bank and the queries (:mod:`lomar.eval.knn_shared`), the main one scores, and every one returns the score.
    ``say``: given each split's line of its images smaller than the resize (upscaled, as knn and linprobe say them),
    at the first scoring, where any is (the main process's count is every process's; the images are the same at each
    scoring).
    """

    def __init__(self, root: str | Path, img_size: int, batch_size: int = 128, workers: int = 2,
                 k: int = DINO_K, temperature: float = DINO_TEMPERATURE, worker_init_fn=None, decode: str = "full",
                 rank: int = 0, world_size: int = 1, say: Callable[[str], object] | None = None):
        # every process lists the folders: the first of each machine says what it found (another's may differ)
        self.loaders = knn_loaders(root, img_size=img_size, batch_size=batch_size, workers=workers,
                                   worker_init_fn=worker_init_fn, decode=decode,
                                   warn=world_size <= 1 or first_on_machine())
        self.k, self.temperature = k, temperature
        self.shares = tuple(share_loader(loader, rank, world_size) for loader in self.loaders) \
            if world_size > 1 else None
        self.say, self.resize = say, eval_resize(img_size)
        self.counted = False  # the splits' images smaller than the resize

    def __call__(self, encoder: VisionTransformer, device: torch.device | str = "cpu") -> float:
        small = (None, None) if self.counted else (SmallImages(self.resize), SmallImages(self.resize))
        self.counted = True
        if self.shares is None:
            score = knn_accuracy(encoder, *self.loaders, k=self.k, temperature=self.temperature, device=device,
                                 small=small)
            self._say(small)
            return score
        train, val = (shared_features(encoder, loader, share, device, f"k-NN {name} features", small=count)
                      for loader, share, name, count in zip(self.loaders, self.shares, ("train", "val"), small))
        self._say(small)
        score = torch.zeros((), dtype=torch.float64, device=device)
        if train is not None:  # the main process
            score.fill_(knn_top1(*train, *val, self.k, self.temperature, device))
        dist.broadcast(score, src=0)
        return float(score)

    def _say(self, small: tuple[SmallImages | None, SmallImages | None]) -> None:
        for loader, count in zip(self.loaders, small):
            if self.say and count is not None and count.count:
                self.say(f"{loader.dataset.root}: {count.line()}")
