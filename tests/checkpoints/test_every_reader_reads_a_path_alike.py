"""Every public reader of a pretrained model or encoder (lomar.load_model, formats.encoder_weights, lomar export,
lomar predict, lomar.dense.load_encoder, --pretrained's load_pretrained_encoder) reads a path by one rule
(export_leftovers.readable_file, which formats.read applies): a run folder as the checkpoint it is read by, a
finished pretraining run folder as its export, a folder whose export is set aside, an empty folder, a missing path or
a text file refused in read()'s one line."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import dead_pid, detector_file, segmenter_file
from lomar import LoMaR, VisionTransformer, ViTConfig, export_encoder, load_model
from lomar.checkpoints import formats
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.export_leftovers import writer_tag
from lomar.checkpoints.file_names import ENCODER_WEIGHTS, RUN_ENCODER
from lomar.checkpoints.io import atomic_save
from lomar.checkpoints.kinds import FINETUNE_FORMAT, PRETRAIN_FORMAT
from lomar.cli.app import main
from lomar.dense import load_encoder
from lomar.eval.features import load_pretrained_encoder
from lomar.eval.predict import load_trained
from lomar.models.mask_rcnn import ViTMaskRCNN
from lomar.models.segmenter import UperNetSegmenter

VIT = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
DENSE = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2)


def _set_aside(folder: Path, pid: int) -> None:
    """``folder``'s export moved aside as a write_export of process ``pid`` on this machine does mid-swap."""
    tag = f"{writer_tag().split('-')[0]}-{pid}-0123456789abcdef"
    for name in ("config.json", RUN_ENCODER):
        os.replace(folder / name, folder / f".{name}.old-{tag}")


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """Each kind of path a reader is given, built once: run folders of pretrain (finished, stopped, its export set
    aside by a dead or a live export), finetune, detect and segment, the files they are read by, and what is no
    model at all."""
    root = tmp_path_factory.mktemp("paths")
    torch.manual_seed(0)
    model = LoMaR(VIT, window_size=2, num_windows=1)
    checkpoint = {**pretrain_checkpoint(model), "format": PRETRAIN_FORMAT, "step": 1}
    kinds = {}
    for kind in ("finished", "stopped", "interrupted", "under way"):
        run = kinds[kind] = root / kind.replace(" ", "_")
        atomic_save(checkpoint, run / "last.pt")
        if kind != "stopped":
            export_encoder(model.encoder, run, weights_name=RUN_ENCODER)
    _set_aside(kinds["interrupted"], dead_pid())
    _set_aside(kinds["under way"], os.getpid())  # a live writer's: mid-swap
    kinds["finetune"] = root / "finetune"
    for name, classes in (("last.pt", 3), ("best.pt", 2)):
        classifier = VisionTransformer(VIT, num_classes=classes)
        atomic_save({"model": classifier.state_dict(), "config": VIT.to_dict(), "format": FINETUNE_FORMAT,
                     "step": 1}, kinds["finetune"] / name)
    kinds["damaged best"] = root / "damaged_best"  # a run folder whose best.pt is cut short: its last.pt is named
    atomic_save(checkpoint, kinds["damaged best"] / "last.pt")
    (kinds["damaged best"] / "best.pt").write_bytes(b"PK\x03\x04 cut short")
    for kind in ("detect", "segment"):
        (root / kind).mkdir()
        kinds[kind] = root / kind
    detector_file(kinds["detect"] / "last.pt", ViTMaskRCNN(VisionTransformer(DENSE), 3, 64))
    segmenter_file(kinds["segment"] / "last.pt",
                   UperNetSegmenter(VisionTransformer(DENSE), 3, channels=16, aux_channels=8))
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a checkpoint\n")
    return {**kinds, "empty folder": root / "empty", "missing": root / "missing.pt", "text file": root / "notes.txt"}


def _sum(state: dict) -> float:
    return float(sum(value.double().sum() for value in state.values() if value.is_floating_point()))


def _export(path: Path, out: Path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["export", str(path), "--to", str(out)])
    if code:
        raise ValueError(err.getvalue().strip().removeprefix("lomar export: error: "))
    return ("exported", _sum(load_file(out / ENCODER_WEIGHTS)))


READERS = {
    "load_model": lambda path, out: (type(model := load_model(path)).__name__, _sum(model.state_dict())),
    "encoder_weights": lambda path, out: (weights := formats.encoder_weights(path)).source + str(_sum(weights.state)),
    "--pretrained": lambda path, out: ("encoder", _sum(load_pretrained_encoder(path).state_dict())),
    "dense.load_encoder": lambda path, out: ("encoder", _sum(load_encoder(path).state_dict())),
    "lomar export": _export,
    "predict": lambda path, out: (trained := load_trained(path)).kind + str(trained.path),
}


def _outcome(reader: str, path: Path, out: Path, given: Path | None = None):
    """What ``reader`` gives of ``path``: what it read, or its refusal's words (``given`` there as PATH)."""
    try:
        return READERS[reader](path, out)
    except (ValueError, FileNotFoundError, TypeError) as exc:  # predict's UsageError is a ValueError
        return str(exc).replace(str(given), "PATH") if given else str(exc)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind, file", [("stopped", "last.pt"), ("finetune", "best.pt"), ("detect", "last.pt"),
                                        ("segment", "last.pt")])
def test_a_run_folder_is_read_as_the_checkpoint_it_is_read_by(paths, tmp_path, reader, kind, file):
    """A run folder without an export: what each reader gives of its best.pt, else last.pt (its model, its
    encoder, the refusal naming it), not a refusal of the folder."""
    folder = paths[kind]
    assert _outcome(reader, folder, tmp_path / "a") == _outcome(reader, folder / file, tmp_path / "b")


@pytest.mark.parametrize("reader", READERS)
def test_a_finished_pretraining_run_folder_is_read_as_its_export(paths, tmp_path, reader):
    """Its export, not its last.pt (predict refuses it as the exported encoder it reads, calling it a run's folder)."""
    folder = paths["finished"]
    export = _outcome(reader, folder / RUN_ENCODER, tmp_path / "b", folder / RUN_ENCODER)
    if reader == "predict":
        export = export.replace("is an exported encoder, which",
                                "is a pretraining run's folder, whose exported encoder")
    assert _outcome(reader, folder, tmp_path / "a", folder) == export


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind", ["interrupted", "under way", "damaged best", "empty folder", "missing", "text file"])
def test_what_no_reader_reads_is_refused_in_reads_words(paths, tmp_path, reader, kind):
    """A run folder whose export is set aside (by a dead export, or one under way: its last.pt is not the export its
    reader wants), one whose best.pt cannot be read (the refusal names its last.pt), an empty folder, a missing path,
    a text file: each reader's refusal is read()'s line."""
    with pytest.raises((ValueError, FileNotFoundError)) as refused:
        formats.read(paths[kind])
    assert _outcome(reader, paths[kind], tmp_path / "out") == str(refused.value)
