"""What encoder a path holds, told before a run reads its weights: BEiT or ViT, and its patch size, so that a
command can refuse an encoder it cannot use while checking its settings."""

from __future__ import annotations

import json
from pathlib import Path

from lomar.checkpoints.export_leftovers import readable_file
from lomar.checkpoints.file_names import CONFIG_NAME
from lomar.checkpoints.formats import read
from lomar.checkpoints.formats_beit import BEiTReader

__all__ = ["holds_beit", "peek_encoder"]


def holds_beit(path: str | Path) -> bool:
    """Whether ``path`` holds a BEiT encoder (False for one that cannot be read: it is reported where it is read)."""
    for mmap in (True, False):  # a checkpoint in torch's legacy (non-zip) format cannot be mapped
        try:
            return isinstance(read(path, mmap=mmap)[0], BEiTReader)
        except (OSError, ValueError, RuntimeError):
            continue
    return False


def peek_encoder(path: str | Path) -> tuple[str, int | None] | None:
    """("beit" or "vit", its patch size or None) for the encoder ``path`` holds, told from its config.json or the
    shape of its mapped patch-embedding weight, no weight read; None where that cannot tell (a sharded or unmappable
    checkpoint, one in no format: the full read reports it), so that a caller can refuse an encoder it cannot use
    before reading one."""
    path = readable_file(Path(path))  # read as load_pretrained_encoder reads it
    if path.is_dir() and (path / ".metadata").is_file():
        return None
    try:
        reader, src = read(path, mmap=True)
        kind = "beit" if isinstance(reader, BEiTReader) else "vit"
        if not src.state:  # an export folder
            args = json.loads((src.path / CONFIG_NAME).read_text()).get("model_args")
            patch = args.get("patch_size") if isinstance(args, dict) else None
            return kind, patch if isinstance(patch, int) else None
    except (OSError, ValueError, RuntimeError, RecursionError, AttributeError):
        return None
    stem = next((v for k, v in src.state.items() if k.endswith("patch_embed.proj.weight") and v.ndim == 4), None)
    return kind, int(stem.shape[-1]) if stem is not None else None
