"""A visual tokenizer anyone can fit offline: k-means over normalised pixel patches.

Choices:
- The 112 px view with 8 px patches gives a 14×14 grid: the dVAE's grid (stride 8 on 112 px) and
  the grid of ViT/16 patches on the 224 px view of the same crop, so each token labels exactly
  one BEiT patch and the k-means tokenizer is a drop-in replacement for the dVAE.
- Each patch (3·8·8 = 192 values) is normalised to zero mean and unit variance over its own
  pixels (as MAE's norm_pix targets). Raw brightness and colour would otherwise dominate the
  Euclidean distance, giving tokens that are mostly "how bright", which a masked model predicts
  from the neighbours trivially; normalised, the codes describe local structure (edges, texture).
- Lloyd iterations from a seeded random choice of distinct patches, distances computed in
  chunks with one matmul each (‖c‖² − 2·x·c; ‖x‖² does not change the argmin). An empty
  cluster is re-seeded with the patch farthest from its centroid. Deterministic given the seed.
- A vocabulary larger than the number of fitting patches is an error (not silently capped): the
  BEiT head's size is the vocabulary, so a quietly smaller one would mismatch later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from lomar.checkpoints.io import atomic_write_bytes
from lomar.limits import MAX_IMG_SIZE
from lomar.tokenizers.base import FIT_HINT, FORMAT_KEY, Tokenizer, check_tokenizer_file, safetensors_metadata
from lomar.values import is_integer

__all__ = ["KMeansTokenizer", "fit_kmeans_tokenizer", "kmeans_settings", "patch_features", "FORMAT"]

FORMAT = "kmeans_patch"
_NORM_EPS = 1e-6
_CHUNK = 4096  # rows per distance matmul: bounds memory at _CHUNK × vocab floats
_GATHER = 64  # images of an iterable turned into patch features at once
_DAMAGED = "the file is damaged; fit a new one with `lomar tokenizer fit`"


def patch_features(images01: torch.Tensor, patch: int) -> torch.Tensor:
    """images01 (N, C, H, W) → (N, (H/p)·(W/p), C·p·p) per-patch normalised, raster order."""
    n, c, h, w = images01.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch={patch}; resize to a multiple (e.g. 112)")
    x = images01.float().reshape(n, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (var + _NORM_EPS).sqrt()


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (P, F), centroids (V, F) → (index (P,), squared distance (P,))."""
    c_sq = (centroids * centroids).sum(1)
    index, dist = [], []
    for chunk in x.split(_CHUNK):
        d = c_sq[None, :] - 2 * chunk @ centroids.T
        best, arg = d.min(dim=1)
        index.append(arg)
        dist.append((best + (chunk * chunk).sum(1)).clamp_min(0))
    return torch.cat(index), torch.cat(dist)


class KMeansTokenizer(Tokenizer):
    """Token of a patch = its nearest centroid; centroids (vocab, 3·p·p) in normalised-pixel space."""

    def __init__(self, centroids: torch.Tensor, patch: int = 8, input_size: int = 112):
        super().__init__()
        whole = all(is_integer(v) for v in (patch, input_size))
        # a view is at most an image (MAX_IMG_SIZE); a str compared would say "'<=' not supported"
        if not whole or not 1 <= patch <= input_size <= MAX_IMG_SIZE:
            raise ValueError(f"patch={patch!r} and input_size={input_size!r} must be integers, 1 <= patch <= "
                             f"input_size <= {MAX_IMG_SIZE}; use patch 8 with input_size 112")
        if centroids.ndim != 2 or centroids.shape[1] != 3 * patch * patch:
            raise ValueError(f"centroids must be (vocab, 3·{patch}·{patch}={3 * patch * patch}), got "
                             f"{tuple(centroids.shape)}; was it fitted with another patch size?")
        if input_size % patch:
            raise ValueError(f"input_size={input_size} is not a multiple of patch={patch}; use 112 with 8")
        self.register_buffer("centroids", centroids.float().contiguous())
        self.vocab_size, self.input_size, self.stride = centroids.shape[0], input_size, patch

    @property
    def patch(self) -> int:
        return self.stride

    def _tokens(self, images01: torch.Tensor) -> torch.Tensor:
        feats = patch_features(images01, self.patch)
        index, _ = _nearest(feats.flatten(0, 1), self.centroids.to(feats.device))
        return index.view(feats.shape[:2])

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """safetensors with the settings as metadata, written to a temporary file then renamed."""
        meta = {FORMAT_KEY: FORMAT, "vocab_size": str(self.vocab_size), "patch": str(self.patch),
                "input_size": str(self.input_size), **(extra or {})}
        tensors = {"centroids": self.centroids.cpu().contiguous()}
        return atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> KMeansTokenizer:
        """Read a file written by :meth:`save`; ValueError naming the file and the fix when its
        settings are missing, malformed or disagree with the centroids."""
        path = Path(path)
        settings = kmeans_settings(path)
        with safe_open(str(path), framework="pt") as handle:
            if "centroids" not in handle.keys():
                raise ValueError(f"{path} holds no 'centroids' tensor (has {sorted(handle.keys())[:4]}); {_DAMAGED}")
            centroids = handle.get_tensor("centroids")
        if centroids.ndim != 2 or centroids.shape[0] != settings["vocab_size"] or centroids.shape[0] < 2:
            raise ValueError(f"{path}: centroids {tuple(centroids.shape)} do not match vocab_size="
                             f"{settings['vocab_size']} (at least 2 rows); {_DAMAGED}")
        if not centroids.is_floating_point() or not bool(torch.isfinite(centroids).all()):
            raise ValueError(f"{path}: the centroids are not finite floating-point numbers; {_DAMAGED}")
        try:
            return cls(centroids, patch=settings["patch"], input_size=settings["input_size"])
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def kmeans_settings(path: str | Path) -> dict[str, int]:
    """``patch``, ``input_size`` and ``vocab_size`` of a file written by :meth:`KMeansTokenizer.save`, from its
    header alone (the centroids stay on disk); ValueError naming the file and the fix when one is missing or
    malformed, or the file is not a k-means tokenizer."""
    path = Path(path)
    check_tokenizer_file(path)
    meta = safetensors_metadata(path)
    if meta.get(FORMAT_KEY) != FORMAT:
        raise ValueError(f"{path} metadata {FORMAT_KEY}={meta.get(FORMAT_KEY)!r}, expected {FORMAT!r}; "
                         f"fit one with {FIT_HINT}")
    settings = {}
    for key in ("patch", "input_size", "vocab_size"):
        text = meta.get(key)
        if text is None or not text.isdecimal() or int(text) < 1:  # isdigit() takes '²', which int() refuses
            problem = f"{key} is missing" if text is None else f"{key}={text!r} is not a positive whole number"
            raise ValueError(f"{path}: metadata {problem}; {_DAMAGED}")
        settings[key] = int(text)
    return settings


def _gather_features(images: torch.Tensor | Iterable[torch.Tensor], patch: int, input_size: int) -> torch.Tensor:
    batches = [images] if isinstance(images, torch.Tensor) else images
    feats, pending, rows = [], [], 0

    def flush() -> None:  # one call per _GATHER images: image by image, the small ops took 4x as long
        if pending:
            feats.append(patch_features(torch.cat(pending), patch).flatten(0, 1))
            pending.clear()

    for batch in batches:
        batch = batch if batch.ndim == 4 else batch.unsqueeze(0)
        if batch.shape[1] != 3 or tuple(batch.shape[-2:]) != (input_size, input_size):
            raise ValueError(f"k-means fitting needs images (3, {input_size}, {input_size}) or batches of them "
                             f"in [0, 1], got {tuple(batch.shape)}; resize the views to {input_size} px")
        pending.append(batch)
        rows += batch.shape[0]
        if rows >= _GATHER:
            flush()
            rows = 0
    flush()
    if not feats:
        raise ValueError("no images to fit the k-means tokenizer on; pass at least one image")
    return torch.cat(feats)


def fit_kmeans_tokenizer(images: torch.Tensor | Iterable[torch.Tensor], vocab_size: int = 8192, patch: int = 8,
                         seed: int = 0, iters: int = 20, input_size: int = 112,
                         max_patches: int | None = None,
                         progress: Callable[[int, int, int], None] | None = None,
                         device: torch.device | str = "cpu") -> KMeansTokenizer:
    """Fit centroids on every patch of ``images`` ((N, 3, S, S) in [0, 1], or an iterable of such
    images / batches). ``max_patches`` subsamples (seeded) to bound memory. Stops early once no
    assignment changes. ``progress(iteration, patches, changed)`` is called after each iteration's
    assignment (at ImageNet's scale one takes the better part of a minute on a CPU; the iterations run on
    ``device``, the seeded draws on the CPU, so a device changes only the float sums)."""
    whole = {"vocab_size": (vocab_size, 8192), "patch": (patch, 8), "iters": (iters, 20),
             "input_size": (input_size, 112), "seed": (seed, 0),
             "max_patches": (1 if max_patches is None else max_patches, "None (every patch)")}
    wrong = next((name for name, (value, _) in whole.items() if not is_integer(value)), None)
    if wrong:  # else a TypeError from deep in torch (a slice, reshape or manual_seed)
        raise ValueError(f"{wrong}={whole[wrong][0]!r} must be an integer; use e.g. {wrong}={whole[wrong][1]}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size} must be >= 2; use e.g. 8192")
    if max_patches is not None and max_patches < 1:
        raise ValueError(f"max_patches={max_patches} must be >= 1, or None to fit on every patch")
    if iters < 1:
        raise ValueError(f"iters={iters} must be >= 1; use e.g. 20")
    if not 1 <= patch <= input_size:
        raise ValueError(f"patch={patch} must be in [1, input_size={input_size}]; use 8 with 112")
    if input_size % patch:
        raise ValueError(f"input_size={input_size} is not a multiple of patch={patch}; use 112 with 8")
    x = _gather_features(images, patch, input_size)
    gen = torch.Generator().manual_seed(int(seed))  # numpy's: manual_seed takes Python ints only
    if max_patches is not None and x.shape[0] > max_patches:
        x = x[torch.randperm(x.shape[0], generator=gen)[:max_patches]]
    if vocab_size > x.shape[0]:
        per_image = (input_size // patch) ** 2
        raise ValueError(f"vocab_size={vocab_size} is more than the {x.shape[0]} patches to fit on; pass "
                         f"vocab_size <= {x.shape[0]} or at least {-(-vocab_size // per_image)} images "
                         f"({per_image} patches each)")
    x = x.to(device)
    centroids = x[torch.randperm(x.shape[0], generator=gen)[:vocab_size].to(device)].clone()
    assign = None
    for iteration in range(1, iters + 1):
        new_assign, dist = _nearest(x, centroids)
        changed = x.shape[0] if assign is None else int((new_assign != assign).sum())
        if progress is not None:
            progress(iteration, x.shape[0], changed)
        if not changed:
            break
        assign = new_assign
        counts = torch.bincount(assign, minlength=vocab_size)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        empty = (~filled).nonzero().flatten()
        if empty.numel():
            far = dist.topk(empty.numel()).indices  # ties broken by index: deterministic
            centroids[empty] = x[far]
    return KMeansTokenizer(centroids.cpu(), patch=patch, input_size=input_size)
