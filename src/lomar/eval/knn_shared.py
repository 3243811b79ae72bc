"""Frozen features under torchrun (``pretrain --knn-every``, ``lomar knn`` and ``lomar linprobe``): every process
extracts its share of a split, and the main process gathers the shares in the split's own order, so it scores exactly
what one process would.

Shared, so that no GPU idles through the pass and no process waits in a collective while another extracts a whole
bank: NCCL ends a collective that waits over 10 minutes (its default timeout), less than an ImageNet-size bank takes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from lomar.data.collate import BadDataTracker
from lomar.data.small_images import SmallImages
from lomar.eval.features import Pool, check_read, extract_features, read_features
from lomar.models.vit import VisionTransformer

__all__ = ["batch_share", "share_loader", "gather_rows", "shared_features", "split_features"]

# Bytes a process sends in one gather of features: all of ImageNet's ViT-B bank at once (3.9 GB) would have to sit
# on the main GPU beside the training run, NCCL sending only device tensors.
BLOCK_BYTES = 2**28


def batch_share(size: int, batch_size: int, rank: int, world_size: int) -> range:
    """The indices of a split of ``size`` that process ``rank`` of ``world_size`` reads: a run of whole batches of
    ``batch_size`` (the split's last batch short), the batches dealt in order, as evenly as they go (none to a
    process when there are fewer batches than processes). Whole batches, so every batch is one that a single
    process reads: a matrix product's kernel follows its shape, and features of other batches could round otherwise.
    """
    batches = -(-size // batch_size)
    first, last = batches * rank // world_size, batches * (rank + 1) // world_size
    return range(min(size, first * batch_size), min(size, last * batch_size))


def share_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """``loader`` (unshuffled, as :func:`~lomar.eval.features.knn_loaders` builds them) over this process's
    :func:`batch_share` of its dataset."""
    share = batch_share(len(loader.dataset), loader.batch_size, rank, world_size)
    return DataLoader(Subset(loader.dataset, share), loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers if len(share) else 0,  # no workers started to read nothing
                      collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn)


def gather_rows(rows: torch.Tensor, counts: list[int], device: torch.device | str,
                block_bytes: int = BLOCK_BYTES) -> torch.Tensor | None:
    """Every process's ``rows`` (``counts[rank]`` of them, the same trailing shape and dtype everywhere) joined in
    rank order on the main process (on the CPU), None on the others. A collective: sent through ``device``
    (NCCL's must be CUDA tensors) in blocks of at most ``block_bytes`` a process, each padded to the longest share's
    rows and trimmed again, so no padding enters the result."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tail, main, most = rows.shape[1:], rank == 0, max(counts)
    step = max(1, block_bytes // (rows.element_size() * math.prod(tail) * world))
    out = torch.empty((sum(counts), *tail), dtype=rows.dtype) if main else None
    starts = [sum(counts[:r]) for r in range(world)]
    for begin in range(0, most, step):
        size = min(step, most - begin)
        block = torch.zeros((size, *tail), dtype=rows.dtype, device=device)
        mine = rows[begin:begin + size]
        block[:len(mine)] = mine.to(device)
        parts = [torch.empty_like(block) for _ in range(world)] if main else None
        dist.gather(block, parts, dst=0)
        for r, part in enumerate(parts or ()):
            n = max(0, min(size, counts[r] - begin))
            out[starts[r] + begin:starts[r] + begin + n] = part[:n].cpu()
    return out


def shared_features(encoder: VisionTransformer, loader: DataLoader, share: DataLoader, device: torch.device | str,
                    desc: str, pool: Pool = "mean",
                    bad: BadDataTracker | None = None,
                    small: SmallImages | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features, labels) of ``loader``'s whole split on the main process, in the split's order, as
    :func:`~lomar.eval.features.extract_features` gives them (``pool``); None on the others. A collective: each
    process extracts ``share`` (:func:`share_loader`). Unreadable images are checked over the whole split, on every
    process alike, before any features are sent: all raise the same UsageError, and none waits for the others.
    ``bad``, where given, takes every process's unreadable images (on every process), ``small`` their images smaller
    than its size (on the main process).
    The main process shows its progress (``desc``), which is the others' too: their shares differ by a batch at most."""
    mine, small_mine = BadDataTracker(len(share.dataset), warn=False), SmallImages(small.size if small else 0)
    feats, labels = read_features(encoder, share, device, pool, mine, desc if dist.get_rank() == 0 else None,
                                  small_mine)
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, (len(feats), feats.shape[1] if len(feats) else 0, list(mine.bad),
                                    (small_mine.count, small_mine.smallest)))
    whole = BadDataTracker(len(loader.dataset), warn=False) if bad is None else bad
    for _, _, paths, smalls in shares:
        whole.update(paths, len(paths))
        if small is not None and dist.get_rank() == 0:
            small.join(*smalls)
    counts, dim = [count for count, _, _, _ in shares], max(width for _, width, _, _ in shares)
    check_read(loader.dataset, sum(counts), whole)
    feats = gather_rows(feats.reshape(len(labels), dim), counts, device)
    labels = gather_rows(labels, counts, device)
    return None if feats is None else (feats, labels)


def split_features(encoder: VisionTransformer, loader: DataLoader, device: torch.device | str, pool: Pool,
                   bad: BadDataTracker, desc: str = "features",
                   small: SmallImages | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`~lomar.eval.features.extract_features` of ``loader``'s split; in a process group of several
    (torchrun), :func:`shared_features` of this process's :func:`share_loader` (None but on the main process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return extract_features(encoder, loader, device, pool, bad=bad, desc=desc, small=small)
    share = share_loader(loader, dist.get_rank(), dist.get_world_size())
    return shared_features(encoder, loader, share, device, desc, pool, bad, small)
