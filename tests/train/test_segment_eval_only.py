"""`lomar segment`'s evaluation of a finished run: the final evaluation of the best checkpoint, and --eval-only
scoring a trained segmenter (one of an older layout included) as its run did."""

from __future__ import annotations

import json
import shutil

import torch
from segment_cli import _segment

from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.models.vit import VisionTransformer, ViTConfig


def test_the_final_evaluation_can_be_the_best_checkpoint(digits, tmp_path, capsys):
    # evaluated only at the end (--eval-every beyond the run): that score is the run's best so far
    out = tmp_path / "run"
    assert _segment(digits, out, "--model", "vit_tiny_patch16", "--max-steps", "2", "--eval-every", "50",
                    "--eval-mode", "whole") == 0
    assert "best mIoU" in capsys.readouterr().out
    best = safe_load(out / "best.pt")
    assert best["step"] == 2 and best["metrics"]["mIoU"] == json.loads(
        (out / "metrics.jsonl").read_text().splitlines()[-1])["mIoU"]


def test_eval_only_scores_a_trained_segmenter_as_its_run_did(digits, tmp_path, capsys, monkeypatch):
    """--eval-only --pretrained RUN: the run's classes, size and evaluation, the same scores and predictions as its own
    final evaluation, the file and step scored in the record; what contradicts the segmenter is refused in one line."""
    run = tmp_path / "run"
    assert _segment(digits, run, "--model", "vit_tiny_patch16", "--max-steps", "2", "--eval-every", "50",
                    "--eval-mode", "whole", "--lr", "1e-2") == 0
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    evaluate = ["segment", "--eval-only", "--pretrained", str(run), "--workers", "0", "--threads", "1", "--device",
                "cpu"]
    capsys.readouterr()
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(f) or load(f, *a, **k))
    # --batch-size 1: scoring trains nothing, so training's BatchNorm minimum of 2 crops is not asked for
    assert main([*evaluate, "--out", str(tmp_path / "scored"), "--batch-size", "1"]) == 0, capsys.readouterr().err
    assert reads == [run / "best.pt"]  # read once: the settings checked and the weights scored are of one read
    monkeypatch.undo()
    # what it scores, as a run's start-up line: on stdout with the score line
    assert "lomar segment: segmenter loaded from " + str(run / "best.pt") + " (step 2), 32 px" in \
        capsys.readouterr().out
    scored = json.loads((tmp_path / "scored" / "metrics.jsonl").read_text())
    assert scored["eval_only"] is True and scored["checkpoint"] == str(run / "best.pt") and scored["step"] == 2
    assert {k: scored[k] for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "eval")} == \
        {k: final[k] for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "eval")}
    assert final["eval"] == {"mode": "whole", "stride": None}  # the run's records and --eval-only's say how they scored
    for png in (run / "predictions").glob("*.png"):
        assert (tmp_path / "scored" / "predictions" / png.name).read_bytes() == png.read_bytes()
    assert scored["img_size"] == scored["trained_img_size"] == 32
    assert "evaluation at 32 px, its trained size: mIoU" in (tmp_path / "scored" / "per_class.md").read_text()
    # another mode and stride than the run's: the record says which
    assert main([*evaluate, "--out", str(tmp_path / "slid"), "--eval-mode", "slide", "--eval-stride", "16"]) == 0
    assert json.loads((tmp_path / "slid" / "metrics.jsonl").read_text())["eval"] == {"mode": "slide", "stride": 16}
    # another size than its own (mmseg's testing at other scales): scored there, the record and table say both sizes;
    # a run's stride, of its own windows, is not taken there
    ckpt = safe_load(run / "best.pt")
    ckpt["settings"].update(eval_mode="slide", eval_stride=16)
    torch.save(ckpt, tmp_path / "slid.pt")
    capsys.readouterr()
    assert main([*evaluate, "--pretrained", str(tmp_path / "slid.pt"), "--out", str(tmp_path / "64"), "--img-size",
                 "64"]) == 0
    assert "(step 2), 64 px, not its trained 32 px" in capsys.readouterr().out
    at64 = json.loads((tmp_path / "64" / "metrics.jsonl").read_text())
    assert (at64["img_size"], at64["trained_img_size"], at64["eval"]) == (64, 32, {"mode": "slide", "stride": 42})
    assert 0 <= at64["mIoU"] <= 100
    assert "evaluation at 64 px, not its trained 32 px: mIoU" in (tmp_path / "64" / "per_class.md").read_text()
    # one saved before segment checkpoints kept their encoder's layout: rebuilt as its run's --model
    del ckpt["encoder_config"]
    ckpt["settings"].update(eval_mode="whole", eval_stride=None)
    torch.save(ckpt, tmp_path / "old.pt")
    assert main([*evaluate, "--pretrained", str(tmp_path / "old.pt"), "--out", str(tmp_path / "old")]) == 0
    assert "its encoder rebuilt as its run's --model vit_tiny_patch16" in capsys.readouterr().out
    old = json.loads((tmp_path / "old" / "metrics.jsonl").read_text())
    assert {k: old[k] for k in ("mIoU", "IoU", "Acc", "eval")} == {k: final[k] for k in ("mIoU", "IoU", "Acc", "eval")}
    torch.save({"model": {}}, tmp_path / "other.pt")
    for flags, message in [
        (["--num-classes", "5"], f"--num-classes 5 differs from the segmenter's own (10) in {run / 'best.pt'}; drop "
                                 f"--num-classes"),
        (["--img-size", "48"], f"--img-size must be a multiple of 32 (the coarsest pyramid stride: twice the patch "
                               f"size 16 of --pretrained {run}), got 48; e.g. 64"),
        (["--zero-label", "class"], "--zero-label class differs from the segmenter's own (ignore)"),
        (["--pretrained", str(tmp_path / "other.pt")], f"--pretrained {tmp_path / 'other.pt'} is not a `lomar "
                                                       f"segment` run or checkpoint; --eval-only scores a trained"),
        ([], "already holds predictions/"),  # the scores just written are not replaced unless asked to
    ]:
        assert main([*evaluate, "--out", str(tmp_path / "scored"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*evaluate, "--out", str(tmp_path / "ddp")]) == 2
    assert "--eval-only runs in one process; run it without torchrun" in capsys.readouterr().err


def test_eval_only_rebuilds_an_older_segmenter_from_the_encoder_its_run_started_from(digits, tmp_path, capsys):
    """A checkpoint saved before segment checkpoints kept their encoder's layout: rebuilt from the --pretrained encoder
    its run started from, scored as the run scored it, at other sizes too (an MAE table and bias tables resampled to a
    larger grid, read for a smaller one); that encoder missing or another one there, refused in one line."""
    from lomar.checkpoints.export import export_encoder

    start = tmp_path / "mae"
    export_encoder(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                                               pos="abs")), start)
    run = tmp_path / "run"
    assert _segment(digits, run, "--pretrained", str(start), "--max-steps", "1", "--eval-every", "50",
                    "--eval-mode", "whole") == 0
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    ckpt = safe_load(run / "best.pt")
    assert ckpt["settings"]["rel_pos"] == "bias"
    del ckpt["encoder_config"]
    torch.save(ckpt, tmp_path / "old.pt")
    evaluate = ["segment", "--eval-only", "--pretrained", str(tmp_path / "old.pt"), "--workers", "0", "--threads", "1",
                "--device", "cpu", "--out"]
    capsys.readouterr()
    assert main([*evaluate, str(tmp_path / "scored")]) == 0
    assert f"its encoder rebuilt from its run's starting encoder {start}" in capsys.readouterr().out
    scored = json.loads((tmp_path / "scored" / "metrics.jsonl").read_text())
    keys = ("mIoU", "IoU", "Acc", "eval")
    assert {k: scored[k] for k in keys} == {k: final[k] for k in keys}
    for png in (run / "predictions").glob("*.png"):
        assert (tmp_path / "scored" / "predictions" / png.name).read_bytes() == png.read_bytes()
    for size in (64, 16):
        assert main([*evaluate, str(tmp_path / f"at{size}"), "--img-size", str(size)]) == 0
        record = json.loads((tmp_path / f"at{size}" / "metrics.jsonl").read_text())
        assert (record["img_size"], record["trained_img_size"]) == (size, 32) and 0 <= record["mIoU"] <= 100
    capsys.readouterr()
    export_encoder(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2,
                                               pos="abs")), tmp_path / "wider")
    old = f"--pretrained {tmp_path / 'old.pt'} is a `lomar segment` checkpoint saved without its encoder's layout"
    ckpt["settings"]["pretrained"] = str(tmp_path / "wider")
    torch.save(ckpt, tmp_path / "wider.pt")
    # a LoMaR encoder of the same shapes there, which takes no bias table
    export_encoder(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)),
                   tmp_path / "lomar")
    ckpt["settings"]["pretrained"] = str(tmp_path / "lomar")
    torch.save(ckpt, tmp_path / "lomar.pt")
    shutil.move(start, tmp_path / "moved")
    for name, message in [
        ("old.pt", f"{old}: it is rebuilt from the encoder its run started from, {start}, which is missing; put that "
                   f"encoder (a copy or its export) back at {start}"),
        ("wider.pt", f"its encoder rebuilt from its run's starting encoder {tmp_path / 'wider'} does not fit its "
                     f"weights: size mismatch for cls_token"),
        ("lomar.pt", f"its encoder rebuilt from its run's starting encoder {tmp_path / 'lomar'} fails: --rel-pos "
                     f"bias: rel_pos 'bias' is for encoders without iRPE (MAE's); a LoMaR encoder has its own "
                     f"relative position: use auto or none; put the encoder its run started from back at "
                     f"{tmp_path / 'lomar'}"),
    ]:
        assert main([*evaluate, str(tmp_path / "refused"), "--pretrained", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
