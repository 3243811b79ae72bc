"""Which checkpoint of a run folder lomar.load_model, lomar predict and an encoder's reader (knn, linprobe, finetune
--pretrained) read (lomar.checkpoints.run_folder, export_leftovers.readable_file)."""

import os

import pytest
import torch

import lomar
from helpers import dead_pid
from lomar import LoMaR, VisionTransformer, ViTConfig, export_encoder
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.export_leftovers import writer_tag
from lomar.checkpoints.file_names import RUN_ENCODER
from lomar.checkpoints.io import atomic_save
from lomar.checkpoints.kinds import FINETUNE_FORMAT, PRETRAIN_FORMAT
from lomar.checkpoints.peek import peek_encoder
from lomar.eval.features import load_pretrained_encoder
from lomar.eval.predict import load_trained

VIT = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def _classifier(path, classes: int, config: ViTConfig = VIT) -> None:
    model = VisionTransformer(config, num_classes=classes)
    atomic_save({"model": model.state_dict(), "config": config.to_dict(), "format": FINETUNE_FORMAT}, path)


def _interrupted_export(run) -> str:
    """A finished pretraining run folder (last.pt + export) whose export a kill set aside; the set-aside files' TAG."""
    torch.manual_seed(0)
    model = LoMaR(VIT, window_size=2, num_windows=1)
    atomic_save({**pretrain_checkpoint(model), "format": PRETRAIN_FORMAT, "step": 1}, run / "last.pt")
    export_encoder(model.encoder, run, weights_name=RUN_ENCODER)
    tag = f"{writer_tag().split('-')[0]}-{dead_pid()}-0123456789abcdef"
    for name in ("config.json", RUN_ENCODER):
        os.replace(run / name, run / f".{name}.old-{tag}")
    return tag


def test_load_model_takes_a_run_folder_as_predict_does(tmp_path):
    """A finetune run folder (no export in it): its best.pt, else its last.pt, for load_model as for lomar predict."""
    run = tmp_path / "ft"
    _classifier(run / "last.pt", classes=3)
    _classifier(run / "best.pt", classes=2)
    assert lomar.load_model(run).num_classes == 2 and load_trained(run).path == run / "best.pt"
    (run / "best.pt").unlink()
    assert lomar.load_model(run).num_classes == 3 and load_trained(run).path == run / "last.pt"


def test_a_finished_pretraining_run_folder_gives_its_exported_encoder(tmp_path):
    """A pretraining run's folder holds its end's export beside last.pt: load_model reads it as an export folder (its
    encoder), as README says; a stopped one, without the export, gives the LoMaR of its last.pt."""
    torch.manual_seed(0)
    model, run = LoMaR(VIT, window_size=2, num_windows=1), tmp_path / "pre"
    atomic_save({**pretrain_checkpoint(model), "format": PRETRAIN_FORMAT, "step": 1}, run / "last.pt")
    assert isinstance(lomar.load_model(run), LoMaR)
    export_encoder(model.encoder, run, weights_name=RUN_ENCODER)
    assert type(lomar.load_model(run)) is VisionTransformer


def test_a_pretraining_run_folder_whose_export_was_interrupted_is_refused(tmp_path):
    """A kill between write_export's renames leaves a finished pretraining run's export set aside (.NAME.old-TAG)
    and no config.json: load_model refuses the folder with read()'s line naming those files and how to get the export
    back, rather than giving last.pt's LoMaR to a caller who expects the encoder."""
    run = tmp_path / "pre"
    tag = _interrupted_export(run)
    with pytest.raises(ValueError) as refused:
        lomar.load_model(run)
    assert str(refused.value) == (
        f"{run} is a folder without config.json; an export into it was interrupted: its previous files are "
        f".config.json.old-{tag}, .{RUN_ENCODER}.old-{tag} (export again, or rename them back to config.json, "
        f"{RUN_ENCODER}); pass its checkpoint, {run / 'last.pt'}")


def test_an_encoder_reader_takes_a_run_folder_as_predict_does(tmp_path):
    """knn, linprobe and finetune --pretrained read a finetune run folder's encoder from its best.pt, else its last.pt,
    the file lomar predict and load_model read of it; peek_encoder, which refuses an encoder before reading it, too."""
    run = tmp_path / "ft"
    _classifier(run / "last.pt", classes=3, config=ViTConfig(img_size=32, patch_size=16, embed_dim=32, depth=1,
                                                               num_heads=2))
    _classifier(run / "best.pt", classes=2)
    assert load_pretrained_encoder(run).load_report.path == str(run / "best.pt") and peek_encoder(run) == ("vit", 8)
    (run / "best.pt").unlink()
    assert load_pretrained_encoder(run).load_report.path == str(run / "last.pt") and peek_encoder(run) == ("vit", 16)


def test_an_encoder_reader_refuses_a_run_folder_whose_export_was_interrupted(tmp_path):
    """Its run finished (the export was there): the encoder reader refuses it as load_model does, naming the set-aside
    export, rather than calling the run unfinished and reading last.pt."""
    run = tmp_path / "pre"
    tag = _interrupted_export(run)
    with pytest.raises(ValueError, match=rf"an export into it was interrupted: its previous files are "
                                         rf"\.config\.json\.old-{tag}, ") as refused:
        load_pretrained_encoder(run)
    assert "not finished" not in str(refused.value) and peek_encoder(run) is None


def test_a_stopped_fsdp_pretraining_run_folder_is_read_as_its_newest_sharded_checkpoint(tmp_path):
    """An --fsdp run keeps checkpoint-N.dcp folders and last.json naming the newest, and no last.pt until its end:
    its folder reads as that checkpoint, as a stopped run's folder reads as its last.pt, not refused as 'a folder
    without config.json; pass ... a folder written by lomar pretrain'. A last.json naming no checkpoint-N.dcp there
    is not followed."""
    import json

    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    run, model = tmp_path / "run", LoMaR(VIT, window_size=2, num_windows=1)
    checkpoint = {**pretrain_checkpoint(model), "format": PRETRAIN_FORMAT, "step": 10, "epoch": 0, "batches_done": 10}
    for step in (5, 10):
        folder = run / f"checkpoint-{step:06d}.dcp"
        dcp.save({"model": checkpoint["model"]}, checkpoint_id=str(folder), no_dist=True)
        atomic_save({**{k: v for k, v in checkpoint.items() if k != "model"}, "step": step}, folder / "meta.pt")
    (run / "last.json").write_text(json.dumps({"checkpoint": "checkpoint-000010.dcp", "step": 10}))
    encoder = load_pretrained_encoder(run)
    assert encoder.load_report.notes == [f"{run} holds no export, so its run has not finished: loaded its last "
                                         f"checkpoint, saved at step 10"]
    torch.testing.assert_close(encoder.state_dict(), load_pretrained_encoder(folder).state_dict())
    assert type(lomar.load_model(run)) is LoMaR
    (run / "last.json").write_text(json.dumps({"checkpoint": "../checkpoint-000010.dcp"}))
    with pytest.raises(ValueError, match="is a folder without config.json"):
        lomar.load_model(run)


def test_a_run_folders_damaged_best_pt_is_refused_naming_its_last_pt(tmp_path):
    """A reader takes a run folder's best.pt and does not pass over it: where it cannot be read, the refusal names
    the run's last.pt as the other checkpoint to pass (a file given itself is refused as it is)."""
    run = tmp_path / "ft"
    _classifier(run / "last.pt", 3)
    (run / "best.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError) as refused:
        lomar.load_model(run)
    assert str(refused.value).startswith(f"cannot read checkpoint {run / 'best.pt'}: ")
    assert str(refused.value).endswith(f"; or pass the run's other checkpoint, {run / 'last.pt'}")
    with pytest.raises(ValueError) as refused:
        lomar.load_model(run / "best.pt")
    assert "other checkpoint" not in str(refused.value)
