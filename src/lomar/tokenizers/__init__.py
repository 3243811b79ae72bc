"""Visual tokenizers for BEiT-style targets: one token per patch of a fixed-size view."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from lomar.tokenizers import dvae, kmeans
from lomar.tokenizers.base import FORMAT_KEY, Tokenizer
from lomar.tokenizers.dvae import DVAEConfig, DVAEEncoder, convert_dvae, load_dvae, map_pixels
from lomar.tokenizers.kmeans import KMeansTokenizer, fit_kmeans_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "DVAEConfig", "DVAEEncoder", "convert_dvae", "load_dvae", "map_pixels",
           "KMeansTokenizer", "fit_kmeans_tokenizer"]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a dVAE (pickled module, ``{'model': sd}`` or safetensors) or a k-means tokenizer.

    safetensors files say their kind in the metadata; anything else is read as a dVAE
    checkpoint without executing pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            kind = (handle.metadata() or {}).get(FORMAT_KEY)
        if kind == kmeans.FORMAT:
            return kmeans.KMeansTokenizer.load(path)
        if kind == dvae.FORMAT:
            return dvae.load_dvae(path)
        raise ValueError(f"{path} has metadata {FORMAT_KEY}={kind!r}, expected {dvae.FORMAT!r} or "
                         f"{kmeans.FORMAT!r}; write it with convert_dvae or KMeansTokenizer.save")
    return dvae.load_dvae(path)
