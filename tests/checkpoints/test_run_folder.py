"""Which checkpoint of a run folder lomar.load_model and lomar predict read (lomar.checkpoints.run_folder)."""

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
from lomar.eval.predict import load_trained

VIT = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def _classifier(path, classes: int) -> None:
    model = VisionTransformer(VIT, num_classes=classes)
    atomic_save({"model": model.state_dict(), "config": VIT.to_dict(), "format": FINETUNE_FORMAT}, path)


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
    torch.manual_seed(0)
    model, run = LoMaR(VIT, window_size=2, num_windows=1), tmp_path / "pre"
    atomic_save({**pretrain_checkpoint(model), "format": PRETRAIN_FORMAT, "step": 1}, run / "last.pt")
    export_encoder(model.encoder, run, weights_name=RUN_ENCODER)
    tag = f"{writer_tag().split('-')[0]}-{dead_pid()}-0123456789abcdef"
    for name in ("config.json", RUN_ENCODER):
        os.replace(run / name, run / f".{name}.old-{tag}")
    with pytest.raises(ValueError) as refused:
        lomar.load_model(run)
    assert str(refused.value) == (
        f"{run} is a folder without config.json; an export into it was interrupted: its previous files are "
        f".config.json.old-{tag}, .{RUN_ENCODER}.old-{tag} (export again, or rename them back to config.json, "
        f"{RUN_ENCODER}); pass its checkpoint, {run / 'last.pt'}")
