"""Reading an export folder and a run folder: bad export folders refused before building, the files an export writes
(0644, atomic), its weights file read with its folder's config, and the one-line answers for a run folder without an
export, a killed export's set-aside files and a finished run named as one."""

import json
import os
import re
import stat

import pytest
import torch
from format_models import VIT

from helpers import dead_pid
from lomar import LoMaR, VisionTransformer, ViTConfig, export_encoder
from lomar.checkpoints import formats
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.export import create_encoder, expected_shapes, read_export
from lomar.checkpoints.io import atomic_save, atomic_write_text
from lomar.checkpoints.peek import holds_beit
from lomar.cli.app import main
from lomar.errors import UsageError


@pytest.mark.parametrize("config", [
    VIT, ViTConfig(img_size=(32, 48), patch_size=16, embed_dim=24, depth=1, num_heads=3, mlp_ratio=2.5, pos="abs"),
    ViTConfig(img_size=16, patch_size=8, embed_dim=8, depth=3, num_heads=1, pos="none"),
])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_expected_shapes_match_the_real_model(config, num_classes):
    real = {k: tuple(v.shape) for k, v in VisionTransformer(config, num_classes=num_classes).state_dict().items()}
    assert expected_shapes(config, num_classes) == real


def _export(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "exp"
    export_encoder(VisionTransformer(VIT), out)
    return out


def _edit(folder, **changes):
    data = json.loads((folder / "config.json").read_text())
    data.update(changes)
    (folder / "config.json").write_text(json.dumps(data))


# Crafted export folders: each must be refused in one line before any model is built.
BAD_EXPORTS = [
    ("huge depth", lambda d: _edit(d, depth=1_000_000), "depth must be an int in [1, 64]"),
    ("string width", lambda d: _edit(d, embed_dim="32"), "embed_dim must be an int"),
    ("bool heads", lambda d: _edit(d, num_heads=True), "num_heads must be an int"),
    ("width over heads", lambda d: _edit(d, num_heads=3), "not divisible by num_heads 3"),
    ("huge width", lambda d: _edit(d, embed_dim=100_000), "embed_dim must be an int in [1, 8192]"),
    ("odd image size", lambda d: _edit(d, img_size=30), "not a multiple of patch_size"),
    ("zero patch", lambda d: _edit(d, patch_size=0), "patch_size must be an int"),
    ("bad pos", lambda d: _edit(d, pos="learned"), "pos must be"),
    ("nan mlp", lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace(
        '"mlp_ratio": 4.0', '"mlp_ratio": NaN')), "mlp_ratio must be a number"),
    ("weights outside", lambda d: _edit(d, weights="../x.safetensors"), "weights must be a file name"),
    ("not json", lambda d: (d / "config.json").write_text("{oops"), "is not valid JSON"),
    ("json list", lambda d: (d / "config.json").write_text("[1]"), "expected an object"),
    ("not safetensors", lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "is not a safetensors file"),
    ("pickle weights", lambda d: torch.save({"a": torch.zeros(1)}, d / "model.safetensors"), "not a safetensors"),
    ("wrong depth", lambda d: _edit(d, depth=3), "does not match"),
    ("negative window", lambda d: _edit(d, window_size=-1), "window_size must be an int in [0, 8192]"),
    ("huge window", lambda d: _edit(d, window_size=10**9), "window_size must be an int in [0, 8192]"),
    ("string window", lambda d: _edit(d, window_size="14"), "window_size must be an int"),
    ("global block past depth", lambda d: _edit(d, window_size=2, global_blocks=[2]),
     "global_blocks must be a list of distinct block indices in [0, 1]"),
    ("repeated global block", lambda d: _edit(d, window_size=2, global_blocks=[1, 1]), "global_blocks must be"),
    ("float global block", lambda d: _edit(d, window_size=2, global_blocks=[1.0]), "global_blocks must be"),
    ("global blocks text", lambda d: _edit(d, window_size=2, global_blocks="1"), "global_blocks must be"),
    ("bad attention", lambda d: _edit(d, attention="fast"), "attention must be one of auto, dense"),
    ("missing weights", lambda d: (d / "model.safetensors").unlink(), "not found"),
]


@pytest.mark.parametrize("name, corrupt, words", BAD_EXPORTS, ids=[b[0] for b in BAD_EXPORTS])
def test_bad_export_folders_are_refused_before_building(tmp_path, name, corrupt, words, monkeypatch, capsys):
    folder = _export(tmp_path)
    corrupt(folder)
    built = []
    monkeypatch.setattr(VisionTransformer, "__init__", lambda *a, **k: built.append(1) or 1 / 0)
    with pytest.raises(UsageError, match=re.escape(words)):
        create_encoder(folder)
    assert not built
    monkeypatch.undo()
    assert main(["export", str(folder), "--to", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_read_export_accepts_a_new_head(tmp_path):
    folder = _export(tmp_path)
    found = read_export(folder, num_classes=4)
    assert (found.num_classes, found.global_pool, found.new_head) == (4, "avg", True)
    assert create_encoder(folder, num_classes=4).head.out_features == 4


def test_settings_given_that_do_not_fit_a_sound_export_are_named_as_the_callers(tmp_path):
    """create_encoder(DIR, depth=4) and img_size=36 break a sound export: the settings given are named, not
    DIR/config.json, which holds neither; a config.json that does not fit its weights is named itself."""
    folder = _export(tmp_path)
    with pytest.raises(UsageError, match=r"^\S+model.safetensors does not match the settings given \(depth=4; "
                                         r"config.json's own fit the weights: drop them\): missing \['blocks.2"):
        create_encoder(folder, depth=4)
    with pytest.raises(UsageError, match=r"^the settings given \(img_size=36; config.json's own fit the weights: drop "
                                         r"them\): img_size 36 is not a multiple of patch_size 8$"):
        read_export(folder, img_size=36)
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), "depth": 3}))
    with pytest.raises(UsageError, match=r"does not match \S+config.json: missing \['blocks.2"):  # the file's own
        create_encoder(folder, img_size=40)


def test_export_files_are_0644_and_an_unrelated_config_is_kept(tmp_path):
    folder = _export(tmp_path)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o644
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"name": "my project"}')
    with pytest.raises(UsageError, match="is not a lomar export; pass --overwrite"):
        export_encoder(VisionTransformer(VIT), other)
    assert main(["export", str(folder), "--to", str(other)]) == 2
    assert json.loads((other / "config.json").read_text()) == {"name": "my project"}
    assert not (other / "model.safetensors").exists()
    export_encoder(VisionTransformer(VIT), folder)  # our own export: replaced without asking
    export_encoder(VisionTransformer(VIT), other, overwrite=True)
    assert "architecture" in json.loads((other / "config.json").read_text())


def test_atomic_write_leaves_no_temporary_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_an_exports_weights_file_is_read_with_what_its_folder_says(sources, tmp_path):
    """Passed alone, an export's safetensors file is read with its folder's config.json, not as a bare state dict:
    an RPE encoder exported at 32 px comes back at 32 px (no table tells the size), and a BEiT export's weights are
    known as BEiT's."""
    from lomar.checkpoints.export_beit import export_beit_encoder
    from lomar.models.beit import BEiT, BEiTConfig

    _, root = sources
    reader, src = formats.read(root / "export" / "model.safetensors")
    assert src.path == root / "export" and reader.encoder(src, {}).config.img_size == 32
    copy = tmp_path / "copy.safetensors"  # a file its folder's config.json does not name is read on its own
    copy.write_bytes((root / "export" / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text((root / "export" / "config.json").read_text())
    assert formats.read(copy)[1].path == copy
    beit = tmp_path / "beit"
    export_beit_encoder(BEiT(BEiTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                        vocab_size=16)), beit)
    assert holds_beit(beit / "encoder.safetensors")


def test_a_run_folder_without_an_export_is_read_as_its_best_pt(tmp_path, capsys):
    """`lomar export FINETUNE_RUN` reads its best.pt, as every reader does, and names that file where it cannot be
    read; a folder that keeps no checkpoint is refused naming what to pass."""
    run = tmp_path / "ft"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")
    (run / "best.pt").write_bytes(b"")
    assert main(["export", str(run), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"error: cannot read checkpoint {run / 'best.pt'}: " in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="a checkpoint file or a folder written by `lomar export`"):
        formats.read(tmp_path)  # no checkpoint kept either


def test_a_folder_whose_export_was_killed_midway_names_its_set_aside_files(tmp_path, capsys):
    """A kill between write_export's renames leaves the old pair at .NAME.old-TAG and no config.json: the reader names
    those files and how to get the export back, not only 'a folder without config.json', which reads as a lost
    export."""
    from lomar.checkpoints.export_leftovers import writer_tag

    run, host = tmp_path / "run", writer_tag().split("-")[0]
    tag = f"{host}-{dead_pid()}-0123456789abcdef"
    export_encoder(VisionTransformer(VIT), run, weights_name="encoder.safetensors")
    atomic_save({}, run / "last.pt")
    for name in ("config.json", "encoder.safetensors"):
        os.replace(run / name, run / f".{name}.old-{tag}")
    assert main(["export", str(run), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and (
        f"{run} is a folder without config.json; an export into it was interrupted: its previous files are "
        f".config.json.old-{tag}, .encoder.safetensors.old-{tag} (export again, or rename them back to config.json, "
        f"encoder.safetensors); pass its checkpoint, {run / 'last.pt'}") in err
    live = f"{host}-{os.getppid()}-0123456789abcdef"
    for name in ("config.json", "encoder.safetensors"):
        os.replace(run / f".{name}.old-{tag}", run / f".{name}.old-{live}")  # a live export's: mid-swap
    with pytest.raises(ValueError, match=rf"without config.json; an export into it is under way \(pid {os.getppid()} "
                                         r"on this machine\): its previous files are set aside as "
                                         r"\.config\.json\.old-.*\(read it once that export ends\); "
                                         r"pass its checkpoint"):
        formats.read(run)


def test_a_finetune_run_folder_is_not_said_to_be_unfinished(tmp_path):
    """load_pretrained_encoder (knn, linprobe, finetune, ...) reads a run folder without an export through its
    last.pt; only a pretraining run ends with an export, so only its folder without one is a stopped run."""
    from lomar.checkpoints.kinds import FINETUNE_FORMAT, PRETRAIN_FORMAT
    from lomar.eval.features import load_pretrained_encoder

    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    classifier = VisionTransformer(config, num_classes=3)
    atomic_save({"model": classifier.state_dict(), "config": config.to_dict(), "format": FINETUNE_FORMAT,
                 "step": 7}, tmp_path / "ft" / "last.pt")
    summary = load_pretrained_encoder(tmp_path / "ft").load_report.summary()
    assert summary.endswith("; saved at step 7") and "not finished" not in summary
    atomic_save({**pretrain_checkpoint(LoMaR(config, window_size=2, num_windows=1)), "format": PRETRAIN_FORMAT,
                 "step": 5}, tmp_path / "pre" / "last.pt")
    stopped = load_pretrained_encoder(tmp_path / "pre").load_report.summary()
    assert "holds no export, so its run has not finished" in stopped


def test_a_finished_pretrain_run_folder_is_named_as_one_not_as_an_export(sources, tmp_path):
    """--pretrained RUN (a finished pretraining's folder) printed 'loaded 10 tensors from exported folder RUN'."""
    from lomar.checkpoints.file_names import RUN_ENCODER
    from lomar.eval.features import load_pretrained_encoder

    model, root = sources
    run = tmp_path / "run"
    export_encoder(model.encoder, run, weights_name=RUN_ENCODER, metadata={"method": "lomar", "step": 4})
    (run / "config.yaml").write_text("method: lomar\n")  # the run's settings, beside its end's export
    summary = load_pretrained_encoder(run).load_report.summary()
    assert summary.startswith(f"loaded {len(model.encoder.state_dict())} tensors from pretrain run folder (lomar) "
                              f"{run}; ")
    assert load_pretrained_encoder(root / "export").load_report.summary().startswith(
        f"loaded {len(model.encoder.state_dict())} tensors from exported folder {root / 'export'}; ")


def test_a_finished_beit_pretrain_run_folder_is_named_as_one_not_as_an_export(tmp_path):
    from lomar.checkpoints.export_beit import export_beit_encoder
    from lomar.eval.features import load_pretrained_encoder
    from lomar.models.beit import BEiT, BEiTConfig

    beit = BEiT(BEiTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, vocab_size=16))
    for folder, weights in (("run", "encoder.safetensors"), ("export", "model.safetensors")):
        export_beit_encoder(beit, tmp_path / folder, weights_name=weights, metadata={"step": 4})
    (tmp_path / "run" / "config.yaml").write_text("method: beit\n")
    for folder, source in (("run", "pretrain run folder (beit)"), ("export", "exported folder (beit)")):
        assert f" tensors from {source} {tmp_path / folder}; " in load_pretrained_encoder(
            tmp_path / folder).load_report.summary()


def test_an_exports_weights_file_holds_no_metadata_whose_order_could_change_its_bytes(tmp_path):
    """safetensors writes its metadata's keys in hash order, which differs between processes: an export holds none,
    so the same weights export to the same bytes (a two-process run's export compared with one process's)."""
    encoder = VisionTransformer(ViTConfig(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=3, pos="abs"))
    export_encoder(encoder, tmp_path / "ex")
    raw = (tmp_path / "ex" / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert "__metadata__" not in header
    assert set(header) == set(encoder.state_dict())


