"""peek_encoder and holds_beit tell what encoder a path holds from as little of it as tells it."""

import pytest
import torch

import lomar.checkpoints.formats
from lomar import LoMaR, ViTConfig
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.io import atomic_save
from lomar.checkpoints.kinds import PRETRAIN_FORMAT
from lomar.checkpoints.peek import holds_beit, peek_encoder

VIT = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def _pretraining() -> dict:
    torch.manual_seed(0)
    return {**pretrain_checkpoint(LoMaR(VIT, window_size=2, num_windows=1)), "format": PRETRAIN_FORMAT, "step": 1}


def test_a_sharded_checkpoint_is_told_from_its_metadata_without_reading_its_tensors(tmp_path, monkeypatch):
    """A `lomar pretrain --fsdp` checkpoint's encoder and patch size are in its metadata (its records' shapes) and
    meta.pt: told from them, its tensors unread, as a file's are from its mapped tensors."""
    import torch.distributed.checkpoint as dcp  # half a second to import: this test alone writes a sharded folder

    checkpoint, folder = _pretraining(), tmp_path / "checkpoint-000001.dcp"
    dcp.save({"model": checkpoint["model"]}, checkpoint_id=str(folder), no_dist=True)
    atomic_save({k: v for k, v in checkpoint.items() if k != "model"}, folder / "meta.pt")

    def unread(path):
        raise AssertionError(f"{path}'s tensors read")

    monkeypatch.setattr(lomar.checkpoints.formats, "read_sharded", unread)
    assert peek_encoder(folder) == ("vit", 8) and not holds_beit(folder)


def test_a_checkpoint_in_torchs_legacy_format_is_read_whole_as_it_cannot_be_mapped(tmp_path):
    """Both tell a file torch cannot map (its legacy non-zip format) from a whole read, not None for one of them."""
    path = tmp_path / "legacy.pt"
    torch.save(_pretraining(), path, _use_new_zipfile_serialization=False)
    assert peek_encoder(path) == ("vit", 8) and not holds_beit(path)


def test_a_mapped_checkpoint_in_no_format_is_not_read_again_whole(tmp_path, monkeypatch):
    """A zip checkpoint of no format lomar reads is mapped and identified as none: None at once, not read a second
    time whole (the legacy format's fallback), which would read a large file for the same answer."""
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    loads, load = [], lomar.checkpoints.formats.safe_load

    def counted(file, *args, **kwargs):
        loads.append(kwargs.get("mmap", False))
        return load(file, *args, **kwargs)

    monkeypatch.setattr(lomar.checkpoints.formats, "safe_load", counted)
    assert peek_encoder(path) is None and not holds_beit(path)
    assert loads and all(loads)  # mapped reads only (the read, and the probe of whether the file maps), none whole


def test_a_checkpoint_on_a_filesystem_without_mmap_is_read_whole(tmp_path, monkeypatch):
    """Some network mounts refuse mmap (ENODEV): a zip checkpoint there is read whole, as its full read reads it, not
    taken for one in no format (a BEiT encoder finetuned with MAE's recipe)."""
    from lomar.models.beit import BEiT, BEiTConfig

    config = BEiTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, vocab_size=16)
    spec = {"arch": "lomar.models.beit:BEiT", "config": config.to_dict(), "args": {}, "prefix": "beit."}
    path = tmp_path / "beit.pt"
    atomic_save({"model": {f"beit.{k}": v for k, v in BEiT(config).state_dict().items()}, "model_spec": spec,
                 "config": {"method": "beit", "img_size": 32}}, path)

    def no_mmap(filename, *args, **kwargs):
        raise RuntimeError(f"unable to mmap {filename}: No such device (19)")

    monkeypatch.setattr(torch.UntypedStorage, "from_file", no_mmap)
    assert holds_beit(path) and peek_encoder(path) == ("beit", 8)


def test_a_probe_saved_without_its_encoder_holds_no_beit(tmp_path):
    """peek_encoder refuses it (the full read's refusal); holds_beit says False, as for a file it cannot read."""
    torch.save({"probe": {"linear.weight": torch.zeros(2, 8)}, "pool": "mean", "top1": 0.5}, path := tmp_path / "p.pt")
    assert holds_beit(path) is False
    with pytest.raises(ValueError, match="holds a linear probe without the encoder it was trained on"):
        peek_encoder(path)
