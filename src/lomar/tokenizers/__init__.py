"""Visual tokenizers for BEiT-style targets: one token per patch of a fixed-size view."""

from __future__ import annotations

from pathlib import Path

from lomar.checkpoints.io import describe_file
from lomar.tokenizers import dvae, kmeans
from lomar.tokenizers.base import (
    CONVERT_HINT,
    FIT_HINT,
    FORMAT_KEY,
    TOKENIZER_FILES,
    Tokenizer,
    check_tokenizer_file,
    is_pickled,
    is_safetensors,
    safetensors_metadata,
)
from lomar.tokenizers.dvae import DVAEConfig, DVAEEncoder, convert_dvae, load_dvae, map_pixels
from lomar.tokenizers.kmeans import KMeansTokenizer, fit_kmeans_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "tokenizer_format", "DVAEConfig", "DVAEEncoder", "convert_dvae", "load_dvae",
           "map_pixels", "KMeansTokenizer", "fit_kmeans_tokenizer"]


def tokenizer_format(path: str | Path) -> str:
    """The kind of tokenizer file ``path`` holds, from its header alone: ``dvae.FORMAT`` or ``kmeans.FORMAT``.
    safetensors files (known by their content, whatever their name) say their kind in the metadata; a pickle or
    torch.save archive is read as a dVAE checkpoint (its loader checks what it holds). ValueError
    (FileNotFoundError) naming the file and the fix otherwise: a text file is no tokenizer of either kind."""
    path = Path(path)
    check_tokenizer_file(path)
    if not is_safetensors(path) and not is_pickled(path):
        raise ValueError(f"{path} is {describe_file(path)}, not a tokenizer file; {TOKENIZER_FILES}")
    kind = safetensors_metadata(path).get(FORMAT_KEY) if is_safetensors(path) else dvae.FORMAT
    if kind not in (kmeans.FORMAT, dvae.FORMAT):
        raise ValueError(f"{path} has metadata {FORMAT_KEY}={kind!r}, expected {dvae.FORMAT!r} or "
                         f"{kmeans.FORMAT!r}; write a dVAE with {CONVERT_HINT} or a k-means tokenizer with {FIT_HINT}")
    return kind


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a dVAE (pickled module, ``{'model': sd}`` or safetensors) or a k-means tokenizer
    (:func:`tokenizer_format` tells which), read without executing pickled code. ValueError
    (FileNotFoundError) naming the file and the fix for anything else, before any model is built.
    """
    loaders = {kmeans.FORMAT: kmeans.KMeansTokenizer.load, dvae.FORMAT: dvae.load_dvae}
    return loaders[tokenizer_format(path)](Path(path))
