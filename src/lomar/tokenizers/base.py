"""The interface every visual tokenizer implements, and format detection for saved ones."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lomar.checkpoints.io import starts_as_safetensors
from lomar.errors import exception_line

__all__ = ["Tokenizer", "FORMAT_KEY", "check_tokenizer_file", "is_safetensors", "is_pickled", "safetensors_metadata",
           "CONVERT_HINT", "FIT_HINT", "TOKENIZER_FILES"]

FORMAT_KEY = "lomar_tokenizer"  # safetensors metadata key naming the tokenizer kind
# Both the command a CLI user runs and the function a Python user calls: the messages reach both.
CONVERT_HINT = "`lomar tokenizer convert` (lomar.tokenizers.convert_dvae)"
FIT_HINT = "`lomar tokenizer fit` (lomar.tokenizers.fit_kmeans_tokenizer)"
TOKENIZER_FILES = (f"a tokenizer file is a k-means tokenizer from {FIT_HINT} or a DALL-E dVAE encoder: the official "
                   f"encoder.pkl, a {{'model': state_dict}} or a safetensors file from {CONVERT_HINT}")


class Tokenizer(nn.Module):
    """Maps images in [0, 1] at ``input_size`` px to one token in [0, vocab_size) per grid cell.

    Subclasses set ``vocab_size``, ``input_size`` and ``stride`` (pixels per grid cell) and
    implement :meth:`_tokens`. The grid is raster ordered, as BEiT's patches.
    """

    vocab_size: int
    input_size: int
    stride: int

    @property
    def grid(self) -> tuple[int, int]:
        side = self.input_size // self.stride
        return side, side

    @torch.no_grad()
    def tokens(self, images01: torch.Tensor) -> torch.Tensor:
        """images01 (N, 3, input_size, input_size) in [0, 1] → (N, Gh·Gw) int64."""
        size = self.input_size
        if images01.ndim != 4 or images01.shape[1] != 3 or tuple(images01.shape[-2:]) != (size, size):
            raise ValueError(f"{type(self).__name__} needs images (N, 3, {size}, {size}) in [0, 1], got "
                             f"{tuple(images01.shape)}; resize the view to {size} px first")
        if not images01.is_floating_point():  # uint8 pixels in [0, 255] would all read as saturated
            raise ValueError(f"{type(self).__name__} needs float images in [0, 1], got {images01.dtype}; "
                             f"divide uint8 pixels by 255")
        return self._tokens(images01).flatten(1).long()

    def _tokens(self, images01: torch.Tensor) -> torch.Tensor:  # (N, Gh, Gw) or (N, Gh·Gw)
        raise NotImplementedError

    def digest(self) -> str:
        """sha256 of the tensors (names, dtypes, shapes, values): the same tokenizer in whatever file or format.
        A BEiT checkpoint keeps it, since it names its tokenizer by path only and the file could be replaced."""
        digest = hashlib.sha256()
        for name, value in sorted(self.state_dict().items()):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name} {flat.dtype} {tuple(value.shape)}\n".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def check_tokenizer_file(path: Path, what: str = "tokenizer file") -> None:
    """FileNotFoundError when ``path`` does not exist, ValueError when it is not a regular file
    (a FIFO would block the read, a device stream forever)."""
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist; check the path")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file; pass a dVAE (.pkl, .pth, .safetensors) or "
                         f"k-means (.safetensors) tokenizer file")


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` is named .safetensors or holds one: an 8-byte little-endian header length,
    then the JSON header. By content too, as a tokenizer saved under another name (``x.pt``) is
    still one, and reading it as a pickle would only refuse it."""
    if path.suffix == ".safetensors":
        return True  # a damaged one is then called a damaged safetensors file, not an unknown format
    try:
        with open(path, "rb") as handle:
            return starts_as_safetensors(handle.read(9))
    except OSError:
        return False


def is_pickled(path: Path) -> bool:
    """Whether ``path`` starts as a pickle or as torch.save's zip archive: the forms a dVAE encoder comes in
    besides safetensors (the official encoder.pkl is torch.save's legacy format, a pickle). From its first bytes:
    what is inside is for the loader to check."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError:
        return False
    return head == b"PK" or head[:1] == b"\x80"


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file; ValueError naming it when it is not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors' own error type is not a ValueError
        reason = exception_line(exc)
        raise ValueError(f"{path} is not a readable safetensors file ({reason}); the file is damaged or "
                         f"not a tokenizer") from None
