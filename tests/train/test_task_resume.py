"""A resumed finetune, detect or segment run rebuilds its model from its own checkpoint: the --pretrained encoder it
started from may be gone, the resumed steps are an uninterrupted run's, and the resume says where its model came
from (not a load report, whose new head read as a fresh start). A checkpoint that keeps no architecture (a segmenter's
without model_spec or encoder_config) is built from --pretrained as its run started. A finetuned BEiT (timm's Beit) is
rebuilt too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from helpers import first_image_split, pretrain, write_images
from lomar.checkpoints.export import export_encoder
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.models.vit import VisionTransformer, ViTConfig

_RUN = ["--workers", "0", "--threads", "1", "--device", "cpu", "--log-every", "1", "--precision", "fp32"]


def _encoder(folder: Path, patch: int, img_size: int) -> Path:
    """An MAE-like encoder (absolute table: a detector and a segmenter add a relative position term to it)."""
    torch.manual_seed(0)
    export_encoder(VisionTransformer(ViTConfig(img_size=img_size, patch_size=patch, embed_dim=32, depth=2,
                                               num_heads=2, pos="abs")), folder)
    return folder


def _same_run(straight: Path, split: Path) -> None:
    a, b = safe_load(straight / "last.pt"), safe_load(split / "last.pt")
    assert a["step"] == b["step"] == 2 and a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    losses = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
              for run in (straight, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def _resumes_without_its_encoder(command, start: Path, tmp_path, capsys) -> tuple[Path, Path]:
    """``command`` (its argv but --max-steps and --out) run 2 steps straight, and 1 step then resumed to 2 with
    ``start`` (its --pretrained) moved away; the two runs' folders, ``start`` put back."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*command, "--max-steps", "2", "--out", str(straight)]) == 0, capsys.readouterr().err
    assert main([*command, "--max-steps", "1", "--out", str(split)]) == 0, capsys.readouterr().err
    shutil.copytree(split, tmp_path / "older")  # its step-1 state, for a test of older checkpoints
    moved = start.rename(tmp_path / "moved")
    capsys.readouterr()
    name = command[0]
    assert main([name, "--out", str(split), "--resume", "auto", "--max-steps", "2"]) == 0, capsys.readouterr().err
    said = capsys.readouterr()
    lines = [line for line in (said.out + said.err).splitlines() if not line.startswith("step ")]
    rebuilt = [line for line in lines if " rebuilt " in line or "loaded " in line]
    assert len(rebuilt) == 1 and rebuilt[0].startswith(
        f"lomar {name}: model rebuilt from the run's checkpoint {split / 'last.pt'} (step 1)"), lines
    assert f"lomar {name}: resumed from {split / 'last.pt'} at step 1 (epoch 0)" in lines
    _same_run(straight, split)
    # what the run records of its start stays as it started
    assert yaml.safe_load((split / "config.yaml").read_text())["pretrained"] == str(start)
    moved.rename(start)
    return straight, split


def test_a_finetune_resumes_without_the_encoder_it_started_from(labelled_folder, tmp_path, capsys):
    start = _encoder(tmp_path / "start", 8, 32)
    command = ["finetune", "--pretrained", str(start), "--data", str(labelled_folder), "--img-size", "32",
               "--batch-size", "2", "--schedule-steps", "4", "--warmup-epochs", "0", "--drop-path", "0.1",
               "--mixup", "0.8", *_RUN]
    _resumes_without_its_encoder(command, start, tmp_path, capsys)


def test_a_detector_resumes_without_the_encoder_it_started_from(digits64, tmp_path, capsys, few_eval_proposals):
    start = _encoder(tmp_path / "start", 16, 64)
    # one validation image: each run ends with an evaluation
    one_val = first_image_split(digits64 / "annotations" / "instances_val.json", tmp_path / "one_val.json")
    coco = ["--train-ann", str(digits64 / "annotations" / "instances_train.json"), "--train-images",
            str(digits64 / "images" / "train"), "--val-ann", str(one_val), "--val-images",
            str(digits64 / "images" / "val")]
    command = ["detect", *coco, "--pretrained", str(start), "--img-size", "64", "--batch-size", "2",
               "--schedule-steps", "4", "--warmup-steps", "1", "--rois-per-image", "16", "--eval-every", "50", *_RUN]
    _resumes_without_its_encoder(command, start, tmp_path, capsys)


def test_a_segmenter_resumes_without_the_encoder_it_started_from_unless_saved_before_its_layout(digits64, tmp_path,
                                                                                                capsys):
    start = _encoder(tmp_path / "start", 8, 32)
    command = ["segment", "--data", str(digits64), "--num-classes", "10", "--pretrained", str(start), "--img-size",
               "32", "--batch-size", "2", "--head-channels", "16", "--schedule-steps", "4", "--warmup-steps", "1",
               "--eval-every", "50", "--eval-mode", "whole", *_RUN]
    straight, _ = _resumes_without_its_encoder(command, start, tmp_path, capsys)
    # a checkpoint without its encoder's layout (no encoder_config, no model_spec): built from --pretrained as its run
    # started
    older = tmp_path / "older"
    ckpt = safe_load(older / "last.pt")
    del ckpt["encoder_config"], ckpt["model_spec"]
    torch.save(ckpt, older / "last.pt")
    resume = ["segment", "--out", str(older), "--resume", "auto", "--max-steps", "2"]
    moved = start.rename(tmp_path / "moved")
    assert main(resume) == 2
    assert (f"--pretrained {start} does not exist; the run being resumed started from it, and its checkpoint keeps no "
            f"architecture of its own") in capsys.readouterr().err
    # where it now lives, given: such a resume reads it, and another --pretrained is not refused as a rebuilt one's is
    assert main([*resume, "--pretrained", str(moved)]) == 0
    said = capsys.readouterr().out  # what it trains: stdout, as the start-up line
    assert (f"lomar segment: model built from --pretrained {moved} as the run started, for the weights of its "
            f"checkpoint {older / 'last.pt'} (step 1), which keeps no architecture of its own; relative position "
            f"term: bias") in said and "loaded " not in said
    _same_run(straight, older)


def test_a_rebuilt_resume_that_does_not_fit_asks_for_no_pretrained_file(labelled_folder, tmp_path, capsys):
    # its model came from the checkpoint alone: "resume with the data and --pretrained it started with" sent the
    # user after a file the resume never read
    start = _encoder(tmp_path / "start", 8, 32)
    out = tmp_path / "run"
    assert main(["finetune", "--pretrained", str(start), "--data", str(labelled_folder), "--img-size", "32",
                 "--batch-size", "2", "--schedule-steps", "2", "--max-steps", "1", "--out", str(out), *_RUN]) == 0, \
        capsys.readouterr().err
    ckpt = safe_load(out / "last.pt")
    ckpt["optimizer"]["param_groups"][0]["params"].pop()  # an optimizer of one parameter fewer than the model's
    torch.save(ckpt, out / "last.pt")
    capsys.readouterr()
    assert main(["finetune", "--out", str(out), "--resume", "auto", "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--resume {out / 'last.pt'} does not fit this run: " in err
    assert "; resume with the data it started with, or start a new run with another --out" in err, err


def test_a_rebuilt_resume_refuses_another_pretrained_file(labelled_folder, tmp_path, capsys):
    # it reads none, yet took the path into config.yaml as the encoder the run started from
    start, other = _encoder(tmp_path / "start", 8, 32), _encoder(tmp_path / "other", 8, 32)
    out = tmp_path / "run"
    assert main(["finetune", "--pretrained", str(start), "--data", str(labelled_folder), "--img-size", "32",
                 "--batch-size", "2", "--schedule-steps", "2", "--max-steps", "1", "--out", str(out), *_RUN]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    assert main(["finetune", "--out", str(out), "--resume", "auto", "--pretrained", str(other)]) == 2
    assert capsys.readouterr().err == (
        f"lomar finetune: error: --pretrained {other} differs from {start} in the run being resumed "
        f"({out / 'last.pt'}), whose model is rebuilt from that checkpoint and reads no --pretrained; drop "
        f"--pretrained to continue the run, or start a new run with another --out\n")
    assert yaml.safe_load((out / "config.yaml").read_text())["pretrained"] == str(start)
    assert main(["finetune", "--out", str(out), "--resume", "auto", "--pretrained", str(start)]) == 0


def test_a_rebuilt_resume_takes_its_encoder_by_another_path_or_moved_along_with_the_run(labelled_folder, tmp_path,
                                                                                        capsys):
    # a `lomar study` passes its cell's CELL/last.pt to the cell's finetune in CELL/evals/: the study folder moved
    # (or reached through a link) mid-evaluation names the recorded file at another path, which is not another encoder
    study = tmp_path / "study"
    start, out = _encoder(study / "cell", 8, 32), study / "cell" / "evals" / "finetune"
    assert main(["finetune", "--pretrained", str(start), "--data", str(labelled_folder), "--img-size", "32",
                 "--batch-size", "2", "--schedule-steps", "3", "--max-steps", "1", "--out", str(out), *_RUN]) == 0, \
        capsys.readouterr().err
    (tmp_path / "link").symlink_to(study)
    linked = tmp_path / "link" / "cell"
    assert main(["finetune", "--out", str(out), "--resume", "auto", "--max-steps", "2", "--pretrained", str(linked)]) \
        == 0, capsys.readouterr().err
    moved = tmp_path / "moved"
    study.rename(moved)
    assert main(["finetune", "--out", str(moved / "cell" / "evals" / "finetune"), "--resume", "auto",
                 "--pretrained", str(moved / "cell")]) == 0, capsys.readouterr().err
    assert yaml.safe_load((moved / "cell" / "evals" / "finetune" / "config.yaml").read_text())["pretrained"] == \
        str(start)
    # another place beside the moved folder is another encoder
    other = _encoder(moved / "other", 8, 32)
    assert main(["finetune", "--out", str(moved / "cell" / "evals" / "finetune"), "--resume", "auto",
                 "--pretrained", str(other)]) == 2
    assert f"--pretrained {other} differs from {start} in the run being resumed" in capsys.readouterr().err


def test_a_beit_finetune_resumes_without_the_pretraining_checkpoint_it_started_from(labelled_folder, tmp_path,
                                                                                     capsys, no_run_figures):
    # its checkpoint's model spec is timm's Beit as the run built it (BEiTClassifier); one saved before it kept that
    # classifier's BEiTConfig, head and pooling, which rebuild it alike
    images = write_images(tmp_path / "flat", 8)
    assert pretrain("--data", str(images), "--out", str(tmp_path / "beit"), "--method", "beit", "--max-steps", "1") == 0
    start = tmp_path / "beit" / "last.pt"
    command = ["finetune", "--pretrained", str(start), "--data", str(labelled_folder), "--img-size", "32",
               "--batch-size", "2", "--schedule-steps", "4", "--warmup-epochs", "0", "--drop-path", "0.1", *_RUN]
    straight, _ = _resumes_without_its_encoder(command, start, tmp_path, capsys)
    older = tmp_path / "older"
    ckpt = safe_load(older / "last.pt")
    assert ckpt["model_spec"]["arch"] == "lomar.models.beit_classifier:BEiTClassifier"
    del ckpt["model_spec"]
    torch.save(ckpt, older / "last.pt")
    start.rename(tmp_path / "moved")
    assert main(["finetune", "--out", str(older), "--resume", "auto", "--max-steps", "2"]) == 0, \
        capsys.readouterr().err
    assert f"model rebuilt from the run's checkpoint {older / 'last.pt'} (step 1)" in capsys.readouterr().out
    _same_run(straight, older)
