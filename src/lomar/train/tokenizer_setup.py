"""The BEiT target for a pretraining run: the user's tokenizer, or a k-means one fitted on the data.

Without ``--tokenizer`` the built-in k-means tokenizer (:mod:`lomar.tokenizers.kmeans`) is fitted on
a seeded sample of the training images (their first crop, as the run sees it) with a vocabulary
scaled to the data, ``min(8192, patches / 4)``, and saved as ``OUT/tokenizer.safetensors``; the
config then names that file, so a resumed run reuses it instead of fitting again.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["resolve_tokenizer", "fit_on_training_images", "FIT_IMAGES", "MAX_VOCAB"]

FIT_IMAGES = 64  # sample of training crops the built-in tokenizer is fitted on
MAX_VOCAB = 8192  # BEiT's vocabulary
KMEANS_PATCH = 8  # pixels per token on the tokenizer's view (the dVAE's stride)


def _sample_views(config, view_size: int, count: int) -> torch.Tensor:
    """(n, 3, view, view) in [0, 1]: epoch-0 crops of a seeded sample of the training images."""
    from torch.utils.data import IterableDataset

    from lomar.data.folder import build_pretrain_dataset
    from lomar.models.beit_pretrain import tokenizer_view

    dataset = build_pretrain_dataset(config.data, config.img_size, config.seed)
    images = []
    if isinstance(dataset, IterableDataset):
        source = iter(dataset)
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed)).tolist()
        source = (dataset[(i, 0)] for i in order)
    for item in source:
        if item["image"] is not None:
            images.append(item["image"])
        if len(images) == count:
            break
    if not images:
        raise ValueError("no readable training image to fit the k-means tokenizer on; check --data")
    return tokenizer_view(torch.stack(images), view_size)


def fit_on_training_images(config, grid: tuple[int, int], count: int = FIT_IMAGES):
    """A k-means tokenizer for the run's patch grid, fitted on ``count`` training crops."""
    from lomar.tokenizers import fit_kmeans_tokenizer

    view = grid[0] * KMEANS_PATCH
    images = _sample_views(config, view, count)
    patches = images.shape[0] * grid[0] * grid[1]
    vocab = max(2, min(MAX_VOCAB, patches // 4))
    print(f"lomar: no --tokenizer: fitting the built-in k-means tokenizer (vocabulary {vocab} = min(8192, "
          f"patches/4), {images.shape[0]} training crops at {view} px); it is not the paper's dVAE", flush=True)
    return fit_kmeans_tokenizer(images, vocab_size=vocab, patch=KMEANS_PATCH, seed=config.seed, input_size=view)


def resolve_tokenizer(config, grid: tuple[int, int]):
    """Load ``config.tokenizer``, or fit one and save it as OUT/tokenizer.safetensors (sets
    ``config.tokenizer``). The tokenizer's view is set to ``grid × its stride`` px (both kinds are
    convolutional / per patch, so any multiple of the stride works)."""
    from lomar.tokenizers import load_tokenizer

    if config.tokenizer:
        try:
            tokenizer = load_tokenizer(config.tokenizer)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"--tokenizer: {exc}") from None
    else:
        tokenizer = fit_on_training_images(config, grid)
        path = Path(config.out) / "tokenizer.safetensors"
        if _is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(path)
            print(f"lomar: tokenizer saved to {path}", flush=True)
        config.tokenizer = str(path)
    tokenizer.input_size = grid[0] * tokenizer.stride
    if hasattr(tokenizer, "config") and hasattr(tokenizer.config, "input_size"):  # the dVAE checks its own
        from dataclasses import replace

        tokenizer.config = replace(tokenizer.config, input_size=tokenizer.input_size)
    return tokenizer


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0

