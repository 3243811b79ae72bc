"""Visual tokenizers for BEiT-style targets: one token per patch of a fixed-size view."""

from lomar.tokenizers.base import Tokenizer, load_tokenizer
from lomar.tokenizers.dvae import DVAEConfig, DVAEEncoder, convert_dvae, load_dvae, map_pixels
from lomar.tokenizers.kmeans import KMeansTokenizer, fit_kmeans_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "DVAEConfig", "DVAEEncoder", "convert_dvae", "load_dvae", "map_pixels",
           "KMeansTokenizer", "fit_kmeans_tokenizer"]
