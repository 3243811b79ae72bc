"""What encoder a path holds, told before a run reads its weights: BEiT or ViT, and its patch size, or none (a
trained model of another kind), so that a command can refuse an encoder it cannot use while checking its settings."""

from __future__ import annotations

import json
from pathlib import Path

from lomar.checkpoints.export_leftovers import readable_file
from lomar.checkpoints.file_names import CONFIG_NAME
from lomar.checkpoints.formats import identify, read_mapped
from lomar.checkpoints.formats_beit import BEiTReader
from lomar.checkpoints.formats_dense import DenseReader
from lomar.checkpoints.formats_probe import LinprobeReader, ProbeOnly
from lomar.checkpoints.reader import Reader, Source
from lomar.checkpoints.sharded import sharded_outline

__all__ = ["holds_beit", "peek_encoder"]

# what a checkpoint or folder that cannot be read raises here; the full read reports it
_UNREADABLE = (OSError, ValueError, RuntimeError, RecursionError, AttributeError)
# the readers of trained models that hold no encoder to start from (a detector, a segmenter, a linear probe), whose
# encoder() refuses from the checkpoint's entries alone
_WHOLE_MODELS = (DenseReader, LinprobeReader)


def _held(path: Path) -> tuple[Reader, Source] | None:
    """The reader and source of what ``path`` holds, reading as little as tells it: a sharded checkpoint's metadata
    (its tensors on the meta device), a file's tensors mapped (a file torch cannot map read whole: one mapped and in
    no format is not read again), an export folder's config.json; None where it cannot be read. ProbeOnly, the full
    read's refusal, for a linear probe saved without its encoder."""
    try:
        path = readable_file(path)  # read as load_pretrained_encoder reads it
        if path.is_dir() and (path / ".metadata").is_file():  # a sharded `lomar pretrain --fsdp` checkpoint
            return identify(path, sharded_outline(path))
        return read_mapped(path)
    except ProbeOnly:  # read, and no encoder: refused as the other trained models that hold none
        raise
    except _UNREADABLE:
        return None


def holds_beit(path: str | Path) -> bool:
    """Whether ``path`` holds a BEiT encoder (False for one that cannot be read, or holds no encoder: it is reported
    where it is read)."""
    try:
        held = _held(Path(path))
    except ProbeOnly:
        return False
    return held is not None and isinstance(held[0], BEiTReader)


def peek_encoder(path: str | Path) -> tuple[str, int | None] | None:
    """("beit" or "vit", its patch size or None) for the encoder ``path`` holds, told from its config.json or the
    shape of its patch-embedding weight, no weight read; None where the path cannot be read (in no format: the full
    read reports it), so that a caller can refuse an encoder it cannot use before reading one. ValueError, the full
    read's, where it holds a trained model that is no encoder (a `lomar detect` or `lomar segment` checkpoint or run,
    a `lomar linprobe --save` file, a linear probe saved without its encoder)."""
    if (held := _held(Path(path))) is None:
        return None
    reader, src = held
    if isinstance(reader, _WHOLE_MODELS):
        reader.encoder(src, {})  # raises, naming what the file is and what to pass instead
    kind = "beit" if isinstance(reader, BEiTReader) else "vit"
    if not src.state:  # an export folder
        try:
            args = json.loads((src.path / CONFIG_NAME).read_text()).get("model_args")
        except _UNREADABLE:
            return None
        patch = args.get("patch_size") if isinstance(args, dict) else None
        return kind, patch if isinstance(patch, int) else None
    stem = next((v for k, v in src.state.items() if k.endswith("patch_embed.proj.weight") and v.ndim == 4), None)
    return kind, int(stem.shape[-1]) if stem is not None else None
