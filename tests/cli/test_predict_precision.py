"""`lomar predict --precision`: autocast to the precision given, and by default (auto) the one the run's own evaluation
used: a classifier's run precision, as finetune --eval-only keeps it, a detector's and segmenter's fp32, as detect and
segment evaluate; a classifier's, a detector's and a segmenter's bf16 answers close to their fp32 ones; a precision
that is none of the choices refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CPU_RUN
from lomar.cli.app import main


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_a_classifiers_bf16_predictions_are_its_fp32_ones_rounded(tmp_path, capsys, monkeypatch, classifier,
                                                                  labelled_folder):
    from lomar.models.vit import VisionTransformer

    seen, forward = [], VisionTransformer.forward  # each forward's autocast dtype (None: off) and logits

    def recorded(self, x):
        seen.append((torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None, forward(self, x)))
        return seen[-1][1]

    monkeypatch.setattr(VisionTransformer, "forward", recorded)
    val = labelled_folder / "val"
    for precision in ("fp32", "bf16"):
        assert main(["predict", str(classifier), str(val), "--out", str(tmp_path / precision), "--precision", precision,
                     *CPU_RUN]) == 0
        assert f"classes, {precision} -> " in capsys.readouterr().out
    (off, fp32), (bf16, rounded) = seen
    assert (off, bf16, rounded.dtype) == (None, torch.bfloat16, torch.bfloat16) and fp32.dtype == torch.float32
    assert torch.allclose(rounded.float(), fp32, atol=0.02, rtol=0.02) and not torch.equal(rounded.float(), fp32)
    rows = _rows(tmp_path / "fp32"), _rows(tmp_path / "bf16")
    assert [row["path"] for row in rows[0]] == [row["path"] for row in rows[1]] and len(rows[0]) == 4
    assert [row["top_k"][0]["class"] for row in rows[0]] == [row["top_k"][0]["class"] for row in rows[1]]
    assert fp32.argmax(1).tolist() == rounded.float().argmax(1).tolist()


def test_auto_predicts_in_the_precision_the_run_trained_in(tmp_path, capsys, classifier, labelled_folder):
    from lomar.checkpoints.io import atomic_save, safe_load
    from lomar.train.precision import resolve_precision

    image = str(next((labelled_folder / "val").rglob("*.png")))
    ckpt = safe_load(classifier / "best.pt")
    assert ckpt["precision"] == "fp32"
    ckpt["settings"]["precision"], ckpt["precision"] = "auto", "bf16"  # auto, which chose bf16 on its machine
    atomic_save(ckpt, tmp_path / "bf16.pt")
    own = resolve_precision("auto", torch.device("cpu"))
    capsys.readouterr()
    for given, precision in (([], "bf16"), (["--precision", "fp32"], "fp32")):
        out = tmp_path / precision
        assert main(["predict", str(tmp_path / "bf16.pt"), image, "--out", str(out), *given, *CPU_RUN]) == 0
        printed, noted = capsys.readouterr()
        assert printed.endswith(f"classes, {precision} -> {out / 'predictions.jsonl'}\n")
        kept = (f"lomar predict: note: precision bf16, the one the classifier trained in (this machine's --precision "
                f"auto would pick {own}); pass --precision {own} to switch\n")
        assert noted == (kept if not given and own != "bf16" else ""), noted


@pytest.mark.parametrize("recorded", ["fp32", "bf16"])
def test_bf16_asked_of_a_cpu_that_emulates_it_names_autos_choice_only_where_it_differs(tmp_path, capsys, monkeypatch,
                                                                                     classifier, labelled_folder,
                                                                                     recorded):
    # auto keeps a classifier's recorded bf16: "auto picks fp32 here" would be false for it
    from lomar.checkpoints.io import atomic_save, safe_load

    monkeypatch.setattr("lomar.train.precision.cpu_has_bf16", lambda: False)
    ckpt = safe_load(classifier / "best.pt")
    ckpt["settings"]["precision"], ckpt["precision"] = "auto", recorded
    atomic_save(ckpt, tmp_path / "run.pt")
    image = str(next((labelled_folder / "val").rglob("*.png")))
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run.pt"), image, "--out", str(tmp_path / "out"), "--precision", "bf16",
                 *CPU_RUN]) == 0
    emulated = ("lomar predict: note: bf16 on this CPU is emulated (no AVX-512 BF16/AMX): expect it several times "
                "slower than fp32")
    way_out = "; --precision auto picks fp32 here" if recorded == "fp32" else ""
    assert capsys.readouterr().err == f"{emulated}{way_out}\n"


def test_a_precision_not_among_the_choices_is_refused_in_one_line(tmp_path, capsys, classifier):
    capsys.readouterr()
    assert main(["predict", str(classifier), str(tmp_path), "--out", str(tmp_path / "out"), "--precision", "fp8",
                 *CPU_RUN]) == 2
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1 and "--precision" in err and "'fp8'" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # trains a detector and a segmenter
@pytest.mark.parametrize("kind", ["detector", "segmenter"])
def test_auto_predicts_a_dense_run_trained_in_bf16_in_fp32_as_its_evaluation_ran(tmp_path, capsys, dense_runs, kind):
    # detect and segment evaluate in fp32 whatever they trained in: auto's predictions are the scores' own
    from lomar.checkpoints.io import atomic_save, safe_load

    data, _, detector, segmenter = dense_runs
    run, images = (detector, data / "images" / "val") if kind == "detector" else (segmenter,
                                                                                  data / "images" / "validation")
    ckpt = safe_load(run / "best.pt")
    ckpt["settings"]["precision"], ckpt["precision"] = "auto", "bf16"  # auto, which chose bf16 on its machine
    atomic_save(ckpt, tmp_path / "bf16.pt")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "bf16.pt"), str(images), "--out", str(tmp_path / "out"), *CPU_RUN]) == 0
    printed, noted = capsys.readouterr()
    assert (", fp32 -> " if kind == "detector" else ", fp32) -> ") in printed and not noted, (printed, noted)


@pytest.mark.slow  # trains a detector and a segmenter
def test_a_detectors_bf16_detections_are_its_fp32_ones_rounded(tmp_path, capsys, monkeypatch, dense_runs):
    from pycocotools import mask as mask_utils
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from lomar.checkpoints.io import atomic_save, safe_load

    # Where a CPU has no bf16 units, autocast emulates them: a 256-channel 3x3 convolution 20-45x slower than fp32's.
    # The box and mask heads convolve each proposal and detection: 50 proposals and 10 detections an image, not up to
    # 1000 and 100, take this test from 137 s to 20 s on a 2-core AVX2 host; the best detection is among them.
    monkeypatch.setattr(RegionProposalNetwork, "post_nms_top_n", lambda self: 50)
    data, _, trained, _ = dense_runs
    ckpt, run = safe_load(trained / "best.pt"), tmp_path / "best.pt"
    ckpt["model_spec"]["args"]["detections_per_image"] = 10
    atomic_save(ckpt, run)
    _predicted_in_fp32_and_bf16(run, data / "images" / "val", tmp_path, capsys, " -> ")
    fp32, bf16 = (json.loads((tmp_path / p / "predictions.json").read_text()) for p in ("fp32", "bf16"))
    assert fp32 != bf16  # autocast ran
    paths = sorted({r["image_id"] for r in fp32})
    assert len(paths) == 2 and paths == sorted({r["image_id"] for r in bf16})
    for path in paths:  # each image's best detection: the same object, its box, score and mask rounded
        first, second = (max((r for r in rs if r["image_id"] == path), key=lambda r: r["score"]) for rs in (fp32, bf16))
        assert first["category_id"] == second["category_id"]
        assert np.allclose(first["bbox"], second["bbox"], atol=1.0) and abs(first["score"] - second["score"]) < 0.01
        masks = [{**r["segmentation"], "counts": r["segmentation"]["counts"].encode()} for r in (first, second)]
        assert mask_utils.iou(masks[:1], masks[1:], [False])[0, 0] > 0.9


@pytest.mark.slow  # trains a detector and a segmenter
def test_a_segmenters_bf16_label_maps_are_mostly_its_fp32_ones(tmp_path, capsys, dense_runs):
    data, _, _, run = dense_runs
    _predicted_in_fp32_and_bf16(run, data / "images" / "validation", tmp_path, capsys, ") -> ")
    names, other = (sorted(path.name for path in (tmp_path / p).iterdir() if path.suffix == ".png")  # not its lock
                    for p in ("fp32", "bf16"))  # or list of what it wrote
    assert len(names) == 2 and names == other
    fp32, bf16 = (np.stack([np.asarray(Image.open(tmp_path / p / name)) for name in names]) for p in ("fp32", "bf16"))
    assert 0.95 < (fp32 == bf16).mean() < 1  # a few pixels where two classes' logits are within bf16's rounding


def _predicted_in_fp32_and_bf16(run, images, out, capsys, after: str) -> None:
    """``run``'s predictions of ``images`` in ``out``/fp32 and ``out``/bf16, each result line naming its precision
    (followed by ``after``)."""
    for precision in ("fp32", "bf16"):
        assert main(["predict", str(run), str(images), "--out", str(out / precision), "--precision", precision,
                     *CPU_RUN]) == 0
        assert f", {precision}{after}" in capsys.readouterr().out


@pytest.mark.parametrize("recorded", ["fp32", None, "fp64"])
def test_predict_eval_only_and_a_resume_keep_one_precision_and_say_so_alike(tmp_path, capsys, monkeypatch, classifier,
                                                                           labelled_folder, recorded):
    """--precision auto on a finetuned classifier's checkpoint: predict, finetune --eval-only and finetune --resume
    each keep the precision it records having trained in (where this machine's auto picks bf16), or where it records
    none, or a value that is no precision, take this machine's auto, and say so in one sentence (the resume's names
    'the run')."""
    import shutil

    from lomar.checkpoints.io import atomic_save, safe_load
    from lomar.models.vit import VisionTransformer

    monkeypatch.setattr("lomar.train.precision.cpu_has_bf16", lambda: recorded == "fp32")  # no emulated bf16 run
    run = tmp_path / "run"
    shutil.copytree(classifier, run)
    for name in ("best.pt", "last.pt"):  # a run under auto, which chose fp32 on its machine; or that records none
        ckpt = safe_load(run / name)
        ckpt["settings"]["precision"] = "auto"
        if recorded is None:
            del ckpt["precision"]
        else:
            ckpt["precision"] = recorded
        atomic_save(ckpt, run / name)
    seen, forward = set(), VisionTransformer.forward  # each forward's autocast dtype (None: off)

    def recorded_forward(self, x):
        seen.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return forward(self, x)

    monkeypatch.setattr(VisionTransformer, "forward", recorded_forward)
    image = str(next((labelled_folder / "val").rglob("*.png")))
    capsys.readouterr()
    assert main(["predict", str(run), image, "--out", str(tmp_path / "pred"), *CPU_RUN]) == 0
    printed, noted = capsys.readouterr()
    assert printed.endswith(f"classes, fp32 -> {tmp_path / 'pred' / 'predictions.jsonl'}\n") and seen == {None}
    note = ("precision fp32, the one the classifier trained in (this machine's --precision auto would pick bf16); "
            "pass --precision bf16 to switch" if recorded == "fp32" else
            "precision fp32, --precision auto's choice on this machine: the checkpoint does not record the precision "
            "the classifier trained in")
    assert noted == f"lomar predict: note: {note}\n", noted
    seen.clear()
    assert main(["finetune", "--eval-only", "--pretrained", str(run), "--val", str(labelled_folder / "val"), "--out",
                 str(tmp_path / "scored"), "--batch-size", "4", *CPU_RUN]) == 0
    assert f"lomar finetune: note: {note}\n" in capsys.readouterr().err and seen == {None}
    seen.clear()
    assert main(["finetune", "--out", str(run), "--resume", "auto", "--epochs", "2", "--max-steps", "3"]) == 0
    printed, noted = capsys.readouterr()
    assert f"lomar finetune: note: {note.replace('the classifier', 'the run')}\n" in noted and seen == {None}
    assert "device cpu, precision fp32" in printed and safe_load(run / "last.pt")["precision"] == "fp32"


def test_a_probe_files_precision_note_names_the_probe(tmp_path, capsys, monkeypatch, labelled_folder):
    """A `lomar linprobe --save` file records the fp32 its probe trained on; where this machine's auto would pick
    bf16, predict keeps fp32 and the note names what trained: the probe, not a classifier."""
    from lomar.eval.linear_probe import probe_checkpoint
    from lomar.models.probe_classifier import LinearProbe
    from lomar.models.vit import VisionTransformer, ViTConfig

    encoder = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    saved = tmp_path / "probe.pt"
    torch.save(probe_checkpoint(encoder, LinearProbe(32, 2), "mean", ["a", "b"], 0.5, 32, "enc.pt"), saved)
    monkeypatch.setattr("lomar.train.precision.cpu_has_bf16", lambda: True)
    image = str(next((labelled_folder / "val").rglob("*.png")))
    capsys.readouterr()
    assert main(["predict", str(saved), image, "--out", str(tmp_path / "out"), *CPU_RUN]) == 0
    printed, noted = capsys.readouterr()
    assert printed.endswith(f"classes, fp32 -> {tmp_path / 'out' / 'predictions.jsonl'}\n")
    assert noted == ("lomar predict: note: precision fp32, the one the probe trained in (this machine's --precision "
                     "auto would pick bf16); pass --precision bf16 to switch\n"), noted
