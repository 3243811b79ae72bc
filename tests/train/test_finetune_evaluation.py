"""A finetune's evaluations: each epoch end's names its epoch, top-5 is reported only where it can miss, and
--eval-only scores a finetuned classifier as its run did."""

from __future__ import annotations

import json

import torch
import yaml
from finetune_cli import _finetune

from helpers import write_images
from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.models.beit import BEiTConfig


def test_each_epoch_end_evaluation_names_the_epoch_it_evaluated(tmp_path, pretrained, folder):
    # step records and the evaluation after them carry the same 0-based epoch; `lomar study`
    # reads the last record's epoch (epochs - 1) to tell a finished finetune from a stopped one
    assert _finetune(pretrained, folder, tmp_path / "run", "--batch-size", "8", "--epochs", "2") == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "top1" in r]
    assert [r["epoch"] for r in evals] == [0, 1]
    for evaluation in evals:
        assert {r["epoch"] for r in records if "loss" in r and r["step"] <= evaluation["step"]} >= {evaluation["epoch"]}


def test_top5_is_reported_only_where_it_can_miss(tmp_path, pretrained):
    # over 2-5 classes every image is a top-5 hit: "top-5 100.00%" would be no score
    from helpers import write_images

    root = tmp_path / "six"
    for split in ("train", "val"):
        for label in "abcdef":
            write_images(root / split / label, 1, size=(36, 36))
    assert _finetune(pretrained, root, tmp_path / "run", "--batch-size", "6", "--max-steps", "1") == 0
    evaluation = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0 <= evaluation["top5"] <= 1 and evaluation["top1"] <= evaluation["top5"]


def test_eval_only_scores_a_finetuned_classifier_as_its_run_did(tmp_path, capsys, monkeypatch, pretrained):
    """--eval-only --pretrained RUN: its best.pt read once, its classes matched by name, its size unless --img-size,
    the run's final top-1/top-5 again; a contradicting setting or other class folders are refused in one line."""
    data = tmp_path / "data"
    for k, name in enumerate("abcdef"):  # six classes: top-5 is scored
        for split in ("train", "val"):
            write_images(data / split / name, 1, size=(36 + k, 36))
    run = tmp_path / "run"  # one step: an epoch of 6 images in batches of 4, then best.pt
    assert _finetune(pretrained, data, run, "--batch-size", "4", "--epochs", "1", "--global-pool", "cls") == 0
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"best top-1 {100 * final['top1']:.2f}% in {run / 'best.pt'}" in capsys.readouterr().out  # as epochs say
    evaluate = ["finetune", "--eval-only", "--val", str(data / "val"), "--workers", "0", "--threads", "1",
                "--device", "cpu", "--batch-size", "3"]
    capsys.readouterr()
    assert main([*evaluate, "--pretrained", str(run), "--print-config"]) == 0  # scored as its run scored
    assert yaml.safe_load(capsys.readouterr().out)["precision"] == "fp32"
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(f) or load(f, *a, **k))
    capsys.readouterr()
    assert main([*evaluate, "--pretrained", str(run), "--out", str(tmp_path / "scored")]) == 0
    assert reads == [run / "best.pt"]  # read once: the settings taken and the weights scored are of one read
    monkeypatch.undo()
    # what it scores, as a run's start-up line: on stdout with the score line (a study silences it)
    assert f"lomar finetune: classifier loaded from {run / 'best.pt'} (step 1), 32 px, 6 classes" in \
        capsys.readouterr().out
    scored = json.loads((tmp_path / "scored" / "metrics.jsonl").read_text())
    assert (scored["eval_only"], scored["checkpoint"], scored["step"]) == (True, str(run / "best.pt"), 1)
    assert (scored["top1"], scored["top5"]) == (final["top1"], final["top5"])
    assert scored["img_size"] == scored["trained_img_size"] == 32
    # its head's rows in another order than the folder's: each image still scored against its class's row
    ckpt = safe_load(run / "best.pt")
    order = [5, 0, 4, 1, 3, 2]
    ckpt["classes"] = [ckpt["classes"][i] for i in order]
    ckpt["model"].update({k: ckpt["model"][k][order] for k in ("head.weight", "head.bias")})
    torch.save(ckpt, tmp_path / "shuffled.pt")
    assert main([*evaluate, "--pretrained", str(tmp_path / "shuffled.pt"), "--out", str(tmp_path / "shuffled")]) == 0
    shuffled = json.loads((tmp_path / "shuffled" / "metrics.jsonl").read_text())
    assert (shuffled["top1"], shuffled["top5"]) == (final["top1"], final["top5"])
    ckpt["settings"]["decode"] = "draft"  # a run whose evaluations read draft JPEGs is scored on them again
    torch.save(ckpt, tmp_path / "draft.pt")
    assert main([*evaluate, "--pretrained", str(tmp_path / "draft.pt"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["decode"] == "draft"
    assert main([*evaluate, "--pretrained", str(tmp_path / "draft.pt"), "--print-config", "--decode", "full"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["decode"] == "full"
    # a run under --precision auto is scored in the precision auto chose for it (fp32), not this machine's auto's:
    # best.pt records it, as last.pt does
    ckpt["settings"]["precision"] = "auto"
    torch.save(ckpt, tmp_path / "auto.pt")
    for given, scored_in in (([], "fp32"), (["--precision", "auto"], "fp32"), (["--precision", "bf16"], "bf16")):
        assert main([*evaluate, "--pretrained", str(tmp_path / "auto.pt"), "--print-config", *given]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["precision"] == scored_in
    from lomar.train import precision  # where this machine's auto would pick bf16, the start says so

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert main([*evaluate, "--pretrained", str(tmp_path / "auto.pt"), "--out", str(tmp_path / "auto")]) == 0
    assert ("lomar finetune: note: precision fp32, the one the classifier trained in (this machine's --precision auto "
            "would pick bf16); pass --precision bf16 to switch\n") in capsys.readouterr().err
    monkeypatch.undo()
    # a classifier that records no precision (an older lomar's): this machine's auto is used, and the start says so
    del ckpt["precision"]
    torch.save(ckpt, tmp_path / "older.pt")
    assert main([*evaluate, "--pretrained", str(tmp_path / "older.pt"), "--out", str(tmp_path / "older")]) == 0
    here = precision.resolve_precision("auto", torch.device("cpu"))
    assert (f"lomar finetune: note: precision {here}, --precision auto's choice on this machine: the checkpoint does "
            f"not record the precision the classifier trained in\n") in capsys.readouterr().err
    # another size: its position table resampled there, the record says both sizes
    assert main([*evaluate, "--pretrained", str(run), "--out", str(tmp_path / "48"), "--img-size", "48"]) == 0
    assert "(step 1), 48 px, not its trained 32 px" in capsys.readouterr().out
    at48 = json.loads((tmp_path / "48" / "metrics.jsonl").read_text())
    assert (at48["img_size"], at48["trained_img_size"]) == (48, 32) and 0 <= at48["top1"] <= 1
    write_images(tmp_path / "other" / "a", 1)
    write_images(tmp_path / "other" / "zebra", 1)
    deeper = tmp_path / "deeper.pt"  # a saved config that is not its weights': named by the checkpoint reader
    torch.save({**ckpt, "config": {**ckpt["config"], "depth": 3}}, deeper)
    # a ViT's weights beside BEiT's config (embed_dim too) and a ViT's model spec: neither read as the other
    ckpt["config"] = BEiTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, vocab_size=8).to_dict()
    torch.save(ckpt, tmp_path / "beit.pt")
    log = (run / "metrics.jsonl").read_text()
    for flags, message in [
        (["--pretrained", str(tmp_path / "beit.pt")], f"--pretrained {tmp_path / 'beit.pt'}: its model_spec names "
                                                      f"'lomar.models.vit:VisionTransformer', not "
                                                      f"'lomar.models.beit_classifier:BEiTClassifier', though it is a "
                                                      f"finetuned BEiT classifier"),
        # the run's log is its training's: a resume cuts it back by step, a study reads its last top-1
        (["--out", str(run)], f"--out {run} holds a run, whose metrics.jsonl is its training's own"),
        (["--resume", str(run / "last.pt")], "continues no run; drop --resume"),  # --out: the run's folder else
        (["--global-pool", "avg"], f"--global-pool avg differs from the classifier's own (cls) in {run / 'best.pt'}; "
                                   f"drop --global-pool"),
        (["--val", str(tmp_path / "other")], f"the class folders of {tmp_path / 'other'} differ from the classifier's "
                                             f"in {run / 'best.pt'} (only in the classifier: ['b', 'c', 'd', 'e', "
                                             f"'f'], only in {tmp_path / 'other'}: ['zebra'])"),
        (["--pretrained", str(pretrained)], f"--pretrained {pretrained} is not a `lomar finetune` run or checkpoint"),
        (["--pretrained", str(deeper)], f"--pretrained {deeper}: its saved config does not describe its weights: "
                                        f"depth 3 (its weights: 2)"),
    ]:
        assert main([*evaluate, "--pretrained", str(run), "--out", str(tmp_path / "refused"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (run / "metrics.jsonl").read_text() == log
