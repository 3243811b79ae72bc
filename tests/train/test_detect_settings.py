"""`lomar detect`'s settings: a bad one is refused in one line before any folder is made, an encoder the pyramid
cannot use is told from its shapes, a trained model that is no encoder is refused before the COCO files are read, and
a detector checkpoint is known by its content and gives a new run its layout."""

from __future__ import annotations

import pytest
import yaml

from lomar.checkpoints.kinds import LINPROBE_FORMAT, SEGMENT_TASK
from lomar.cli.app import main
from lomar.models.vit import model_config


@pytest.mark.parametrize("args, expected", [
    (["--img-size", "100"], "--img-size must be a multiple of 32"),
    (["--jitter", "2", "1"], "--jitter must be LOW HIGH"),
    (["--val-images", "/no/such/folder"], "--val-images /no/such/folder is not a folder"),
    (["--global-blocks", "1", "--window-size", "0"], "--global-blocks needs --window-size"),
    (["--eval-only"], "--eval-only needs --pretrained"),
    (["--model", "vit_tiny_patch14"], "--model vit_tiny_patch14: the feature pyramid needs patch size 16"),
])
def test_bad_settings_are_one_line(args, expected, tiny, tmp_path, capsys):
    (train_ann, train_images), (val_ann, val_images) = tiny
    base = ["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann", str(val_ann),
            "--val-images", str(val_images), "--model", "vit_mini_patch16", "--img-size", "64",
            "--out", str(tmp_path / "run")]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err, err


def test_a_relative_position_term_on_a_lomar_encoder_is_one_line_and_makes_no_folder(tiny, tmp_path, capsys):
    (train_ann, train_images), (val_ann, val_images) = tiny
    out = tmp_path / "run"
    assert main(["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann",
                 str(val_ann), "--val-images", str(val_images), "--model", "vit_mini_patch16", "--img-size", "64",
                 "--rel-pos", "decomposed", "--device", "cpu", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("lomar detect: error: --rel-pos decomposed: --rel-pos 'decomposed' is for encoders without iRPE "
                    "(MAE's); a LoMaR encoder has its own relative position: use auto or none")
    assert not out.exists()


def test_an_encoder_the_pyramid_cannot_use_is_refused_from_its_shapes_before_the_coco_files(tiny, tmp_path, capsys):
    """A patch-8 --pretrained is refused before the validation file's parse, its images' check and the whole
    checkpoint's read (a broken --val-ann here: its COCO error does not come first); the stem's mapped shape or
    config.json tells it."""
    from lomar import LoMaR, export_encoder
    from lomar.checkpoints.convert import pretrain_checkpoint
    from lomar.checkpoints.io import atomic_save

    (train_ann, train_images), _ = tiny
    model = LoMaR(model_config("vit_mini_patch8", img_size=32), window_size=2, num_windows=1)
    atomic_save(pretrain_checkpoint(model), tmp_path / "p8.pt")
    export_encoder(model.encoder, tmp_path / "p8")
    broken = tmp_path / "val.json"
    broken.write_text("{")
    for source in (tmp_path / "p8.pt", tmp_path / "p8"):
        out = tmp_path / f"run-{source.name}"
        assert main(["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann",
                     str(broken), "--val-images", str(train_images), "--pretrained", str(source), "--img-size", "64",
                     "--device", "cpu", "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"lomar detect: error: --pretrained {source}: the feature pyramid needs patch size 16 (strides 4-32), its "
            f"encoder's is 8; pass a patch-16 encoder")
        assert not out.exists()


def test_a_detector_checkpoint_is_known_by_its_content_not_its_suffix(tmp_path):
    # a detector saved or renamed as .pth was "not a `lomar detect` run or checkpoint" to --eval-only, and an encoder
    # to be loaded otherwise
    from lomar.checkpoints.io import atomic_save
    from lomar.checkpoints.kinds import DETECT_FORMAT, find_command_checkpoint

    def detect_checkpoint(path):
        found = find_command_checkpoint(path, "detect")
        return found.path if found is not None else None

    for name in ("model_final.pth", "detector.ckpt", "last.pt"):
        atomic_save({"format": DETECT_FORMAT, "model": {}}, tmp_path / name)
        assert detect_checkpoint(tmp_path / name) == tmp_path / name
    atomic_save({"model": {}}, tmp_path / "encoder.pth")
    (tmp_path / "notes.json").write_text("{}")
    assert detect_checkpoint(tmp_path / "encoder.pth") is None and detect_checkpoint(tmp_path / "notes.json") is None
    assert detect_checkpoint(tmp_path) == tmp_path / "last.pt"  # a run folder: best.pt, else last.pt


@pytest.mark.parametrize("resume", [[], ["--resume", "auto"]])
def test_a_new_run_from_a_detector_takes_its_layout_even_with_resume_auto(tmp_path, capsys, resume):
    # --resume auto in a job script that always passes it: with no checkpoint in --out the run is new, and it trained
    # at the defaults' layout (1024 px, 14-patch windows) instead of the detector's
    from lomar.checkpoints.io import atomic_save
    from lomar.checkpoints.kinds import DETECT_FORMAT

    atomic_save({"format": DETECT_FORMAT, "model": {}, "settings": {"img_size": 256, "window_size": 7}},
                detector := tmp_path / "det.pt")
    (ann := tmp_path / "ann.json").write_text('{"images": [], "annotations": [], "categories": []}')
    assert main(["detect", "--pretrained", str(detector), "--train-ann", str(ann), "--val-ann", str(ann),
                 "--out", str(tmp_path / "run"), *resume, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["img_size"], printed["window_size"]) == (256, 7) and "detector" not in printed


@pytest.mark.parametrize("saved, refusal", [
    ({"task": SEGMENT_TASK}, "checkpoint {path} is a whole `lomar segment` model, not an encoder; pass the encoder "
                             "that run started from (its --pretrained), or a pretraining checkpoint or export"),
    ({"format": LINPROBE_FORMAT}, "{path} is a linear probe on a frozen encoder; pass the encoder it probed"),
], ids=["segmenter", "linear probe"])
def test_a_trained_model_that_is_no_encoder_is_refused_before_the_coco_files(tiny, tmp_path, capsys, saved, refusal):
    """A segmenter or a linear probe given as --pretrained to train on is refused from its entries, before the
    validation file is parsed (minutes for COCO's): this broken one's error does not come first."""
    import torch

    (train_ann, train_images), _ = tiny
    torch.save({"model": {"encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}, **saved},
               path := tmp_path / "last.pt")
    (broken := tmp_path / "val.json").write_text("{")
    assert main(["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann",
                 str(broken), "--val-images", str(train_images), "--pretrained", str(path), "--img-size", "64",
                 "--device", "cpu", "--out", str(out := tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"lomar detect: error: --pretrained {path}: {refusal.format(path=path)}\n"
    assert not out.exists()
    # --eval-only's refusal names the detector it scores, not an encoder to train on
    assert main(["detect", "--eval-only", "--pretrained", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not a `lomar detect` run or checkpoint" in err and "not an encoder" not in err, err


def test_a_probe_saved_without_its_encoder_is_refused_before_the_coco_files(tiny, tmp_path, capsys):
    """A linear probe's file that holds the probe alone names no encoder: refused while the settings are checked, as
    the other trained models that hold none, before the broken validation file's error."""
    import torch

    (train_ann, train_images), _ = tiny
    torch.save({"probe": {"linear.weight": torch.zeros(2, 8)}, "pool": "mean", "top1": 0.5}, path := tmp_path / "p.pt")
    (broken := tmp_path / "val.json").write_text("{")
    assert main(["detect", "--train-ann", str(train_ann), "--train-images", str(train_images), "--val-ann",
                 str(broken), "--val-images", str(train_images), "--pretrained", str(path), "--img-size", "64",
                 "--device", "cpu", "--out", str(out := tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lomar detect: error: --pretrained {path}: {path} holds a linear probe without the encoder "
                          "it was trained on") and err.count("\n") == 1, err
    assert not out.exists()
