"""BEiT pretraining checkpoints and exports through `lomar knn`, `linprobe`, `finetune` and `export`."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from timm.models.beit import Beit, checkpoint_filter_fn

from helpers import pretrain, write_images
from lomar.checkpoints.export_beit import create_timm_beit
from lomar.checkpoints.formats import load_model
from lomar.cli.app import main
from lomar.data.compose import compose_digits
from lomar.eval.features import extract_features, knn_loaders, load_pretrained_encoder
from lomar.models.beit_classifier import BEiTClassifier

EVAL = ["--img-size", "32", "--workers", "0", "--device", "cpu", "--batch-size", "4"]


@pytest.fixture(scope="module")
def beit_run(tmp_path_factory):
    """A 2-step tiny BEiT pretraining run (last.pt + its export in the run folder) and a class-folder dataset."""
    root = tmp_path_factory.mktemp("beit")
    images = write_images(root / "flat", 16)
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            write_images(root / "data" / split / label, count, size=(36, 36))
    assert pretrain("--data", str(images), "--out", str(root / "run"), "--method", "beit", "--max-steps", "2") == 0
    return root


def test_knn_linprobe_finetune_and_export_accept_a_beit_checkpoint(beit_run, tmp_path, capsys):
    ckpt, data = str(beit_run / "run" / "last.pt"), str(beit_run / "data")
    assert main(["knn", ckpt, "--data", data, "--k", "2", *EVAL]) == 0
    assert "k-NN" in capsys.readouterr().out
    assert main(["linprobe", ckpt, "--data", data, "--epochs", "2", *EVAL, "--save", str(tmp_path / "probe.pt")]) == 0
    probed = load_model(tmp_path / "probe.pt").eval()  # the probe on its encoder, timm's Beit, rebuilt whole
    assert isinstance(probed.encoder, BEiTClassifier) and probed(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    assert main(["finetune", "--pretrained", ckpt, "--data", data, "--img-size", "32", "--batch-size", "4",
                 "--workers", "0", "--threads", "1", "--device", "cpu", "--precision", "fp32", "--epochs", "1",
                 "--max-steps", "2", "--out", str(tmp_path / "ft")]) == 0
    assert "newly initialised: fc_norm.weight, fc_norm.bias, head.weight" in capsys.readouterr().out
    saved = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)
    assert saved["step"] == 2 and saved["config"]["vocab_size"] > 1
    capsys.readouterr()
    assert main(["knn", str(tmp_path / "ft" / "last.pt"), "--data", data, *EVAL]) == 2  # refused, one line
    assert "finetuned BEiT classifier" in capsys.readouterr().err
    assert main(["export", ckpt, "--to", str(tmp_path / "ex")]) == 0
    assert json.loads((tmp_path / "ex" / "config.json").read_text())["method"] == "beit"


def test_visualize_draws_a_beit_checkpoints_tokens_and_its_attention(beit_run, tmp_path, capsys):
    run = ["visualize", str(beit_run / "run" / "last.pt"), "--out", str(tmp_path / "v")]
    assert main(run) == 0, capsys.readouterr().err  # no pixels to reconstruct: the tokens it predicts
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["tokens.png"]
    assert main([*run, "--attention", "--context", "window", "--attention-window", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == [
        "attention-00-astronaut.png", "attention-01-chelsea.png", "attention-02-coffee.png", "attention-03-rocket.png",
        "tokens.png"]


def test_features_equal_the_exported_timm_beit(beit_run, tmp_path):
    ckpt = beit_run / "run" / "last.pt"
    assert main(["export", str(ckpt), "--to", str(tmp_path / "ex")]) == 0
    reference = create_timm_beit(tmp_path / "ex")
    loader = knn_loaders(beit_run / "data", img_size=32, batch_size=4, workers=0)[1]
    for source in (ckpt, tmp_path / "ex", beit_run / "run"):  # last.pt, `lomar export`, the run folder's own
        encoder = load_pretrained_encoder(source, img_size=32)
        assert isinstance(encoder, Beit) and encoder.load_report.loaded > 0
        # Per-block tables, each initialised from the shared pretraining one.
        tables = [b.attn.relative_position_bias_table for b in encoder.blocks]
        assert encoder.rel_pos_bias is None and all(torch.equal(t, tables[0]) for t in tables)
        feats, labels = extract_features(encoder, loader)
        expected = torch.cat([reference.forward_features(x)[:, 1:].mean(1) for x, _ in loader])
        assert feats.shape == (len(labels), 32)
        torch.testing.assert_close(feats, expected, rtol=0, atol=1e-5)


def test_classifier_pooling_and_a_new_grid(beit_run):
    ckpt = beit_run / "run" / "last.pt"
    avg = load_pretrained_encoder(ckpt, num_classes=3, img_size=32, drop_path=0.1)
    assert avg.global_pool == "avg" and isinstance(avg.norm, torch.nn.Identity)  # fc_norm: BEiT finetuning
    assert {"norm.weight", "mask_token"} <= set(avg.load_report.dropped) and "head.weight" in avg.load_report.fresh
    assert avg(torch.randn(2, 3, 32, 32)).shape == (2, 3) and avg.group_matcher() and avg.no_weight_decay()
    cls = load_pretrained_encoder(ckpt, num_classes=3, global_pool="cls", img_size=32)
    assert cls.global_pool == "token" and "norm.weight" not in cls.load_report.dropped
    with warnings.catch_warnings(record=True) as caught:  # timm's resampling code's torch warnings kept quiet
        warnings.simplefilter("always")
        big = load_pretrained_encoder(ckpt, img_size=48)  # 4x4 -> 6x6 patches: tables resized, (2·6-1)²+3 rows
    assert not [str(w.message) for w in caught if "timm" in w.filename], [str(w.message) for w in caught]
    assert big.blocks[0].attn.relative_position_bias_table.shape[0] == 11 * 11 + 3
    assert "resized to the 6x6 grid" in big.load_report.summary()
    step = torch.load(ckpt, weights_only=True)["step"]  # the step is said first, as for any other encoder
    assert f"saved at step {step}; relative position tables resized" in big.load_report.summary()
    assert big.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)
    with pytest.raises(ValueError, match="img_size=50 is not a multiple"):
        load_pretrained_encoder(ckpt, img_size=50)
    with pytest.raises(ValueError, match="unknown BEiT encoder setting"):
        load_pretrained_encoder(ckpt, pos="abs")


def test_only_torchs_two_notes_on_timms_resampling_are_kept_quiet(beit_run, monkeypatch):
    """The filter named timm's module alone: any other UserWarning of its resampling code, one that might say the
    resized tables are wrong, went unseen too."""
    import timm.models.beit

    def resample(state, model):
        warnings.warn_explicit("another note on the resampled tables", UserWarning, "interpolate.py", 1,
                               module="timm.layers.interpolate")
        return checkpoint_filter_fn(state, model)

    monkeypatch.setattr(timm.models.beit, "checkpoint_filter_fn", resample)  # what lomar.eval.features calls
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pretrained_encoder(beit_run / "run" / "last.pt", img_size=48)
    assert [str(w.message) for w in caught if w.filename.endswith("interpolate.py")] == [  # timm's, and this one
        "another note on the resampled tables"]


def test_a_beit_export_loads_with_timm_local_dir_and_no_lomar_code(beit_run, tmp_path):
    """As lomar and mae exports do: `timm.create_model('local-dir:EXPORT', pretrained=True)` gives the same features."""
    import timm

    out = tmp_path / "ex"
    assert main(["export", str(beit_run / "run" / "last.pt"), "--to", str(out)]) == 0
    local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    ours = create_timm_beit(out)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(local.forward_features(images), ours.forward_features(images), atol=1e-6)
    # The run folder's own export (encoder.safetensors beside tokenizer.safetensors) too.
    run_local = timm.create_model(f"local-dir:{beit_run / 'run'}", pretrained=True).eval()
    assert sum(p.numel() for p in run_local.parameters()) == sum(p.numel() for p in local.parameters())


def test_a_beit_export_claiming_huge_widths_or_a_path_outside_is_refused_before_building(beit_run, tmp_path,
                                                                                          monkeypatch):
    from lomar.checkpoints import formats
    from lomar.models import beit

    assert main(["export", str(beit_run / "run" / "last.pt"), "--to", str(tmp_path / "ex")]) == 0
    config = json.loads((tmp_path / "ex" / "config.json").read_text())
    built = []
    monkeypatch.setattr(beit.BEiT, "__init__", lambda self, *a, _real=beit.BEiT.__init__, **k:
                        built.append(str(torch.get_default_device())) or _real(self, *a, **k))
    huge = {"embed_dim": 8192, "depth": 64, "num_heads": 16}  # within the bounds, and timm_args agree: shapes decide
    for change, words in (({"beit_config": {**config["beit_config"], **huge}, "timm_args": {**config["timm_args"],
                                                                                          **huge}}, "does not match"),
                          ({"beit_config": {**config["beit_config"], "embed_dim": 16384}}, r"in \[1, 8192\]"),
                          ({"weights": "../../etc/passwd"}, "must be a file name in the same folder")):
        (tmp_path / "ex" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=words):
            formats.load_model(tmp_path / "ex")
    assert built and all(device == "meta" for device in built)  # shapes were compared without storage


def test_segment_refuses_a_beit_encoder_in_one_line(beit_run, tmp_path, capsys):
    compose_digits(tmp_path / "set", img_size=32, images=4, seed=0, digit_scale=(0.3, 0.5))
    code = main(["segment", "--data", str(tmp_path / "set"), "--num-classes", "10", "--img-size", "32",
                 "--pretrained", str(beit_run / "run" / "last.pt"), "--workers", "0", "--device", "cpu",
                 "--out", str(tmp_path / "seg")])
    err = capsys.readouterr().err
    assert code == 2 and "only LoMaR / MAE ViT encoders can be segmentation backbones, not BEiT\n" in err
    assert "Traceback" not in err
    # detect asks its ViTDet layout of the encoder: refused before that, for the same reason
    ann = tmp_path / "set" / "annotations" / "instances_train.json"
    images = str(tmp_path / "set" / "images" / "train")
    code = main(["detect", "--train-ann", str(ann), "--train-images", images, "--val-ann", str(ann), "--val-images",
                 images, "--img-size", "32", "--workers", "0",
                 "--pretrained", str(beit_run / "run" / "last.pt"), "--device", "cpu", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2 and "only LoMaR / MAE ViT encoders can be detection backbones, not BEiT" in err


def test_a_beit_encoder_is_finetuned_with_beits_recipe(beit_run, tmp_path, capsys, monkeypatch):
    """lr 4e-3 at batch 1024 (blr 1e-3) and 20 warm-up epochs unless given; the relative position tables are
    decayed as BEiT's finetuning decays them (timm's Beit exempts them)."""
    import yaml

    from lomar.train import finetune as finetune_module

    ckpt, data = str(beit_run / "run" / "last.pt"), str(beit_run / "data")
    for source, expected in ((ckpt, (1e-3, 20)), (str(beit_run / "run"), (1e-3, 20))):
        assert main(["finetune", "--pretrained", source, "--data", data, "--print-config"]) == 0
        shown = yaml.safe_load(capsys.readouterr().out)
        assert (shown["blr"], shown["warmup_epochs"]) == expected
    assert main(["finetune", "--pretrained", ckpt, "--data", data, "--blr", "2e-4", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["blr"] == 2e-4
    groups = []
    original = finetune_module.FinetuneTask.param_groups
    monkeypatch.setattr(finetune_module.FinetuneTask, "param_groups",
                        lambda self: groups.extend(original(self)) or groups)
    assert main(["finetune", "--pretrained", ckpt, "--data", data, "--img-size", "32", "--batch-size", "4",
                 "--workers", "0", "--threads", "1", "--device", "cpu", "--precision", "fp32", "--max-steps", "1",
                 "--out", str(tmp_path / "ft")]) == 0
    model = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)["model"]
    tables = {k for k in model if "relative_position_bias_table" in k}
    assert tables
    shapes = {tuple(model[k].shape) for k in tables}
    assert any(tuple(p.shape) in shapes for g in groups if g["weight_decay"] > 0 for p in g["params"])
    assert not any(tuple(p.shape) in shapes for g in groups if g["weight_decay"] == 0 for p in g["params"])


def test_a_beit_finetune_saved_before_the_decay_change_resumes(beit_run, tmp_path, capsys):
    """Its model rebuilt from its checkpoint (timm's Beit, of the BEiTConfig it saved), its --pretrained file unread,
    and the relative position tables still undecayed as it started."""
    from lomar.checkpoints.io import safe_load

    ckpt, data, out = str(tmp_path / "beit.pt"), str(beit_run / "data"), tmp_path / "ft"
    shutil.copy(beit_run / "run" / "last.pt", ckpt)
    common = ["--data", data, "--img-size", "32", "--batch-size", "4", "--workers", "0", "--threads", "1",
              "--device", "cpu", "--precision", "fp32"]
    assert main(["finetune", "--pretrained", ckpt, *common, "--max-steps", "1", "--epochs", "2", "--out", str(out),
                 "--no-decay-rel-pos-bias"]) == 0
    saved = safe_load(out / "last.pt")
    del saved["settings"]["decay_rel_pos_bias"], saved["settings"]["train_pos_embed"]  # the older layout
    torch.save(saved, out / "last.pt")
    Path(ckpt).rename(tmp_path / "moved.pt")
    capsys.readouterr()
    assert main(["finetune", "--out", str(out), "--resume", "auto", "--max-steps", "2"]) == 0, capsys.readouterr().err
    assert (f"lomar finetune: model rebuilt from the run's checkpoint {out / 'last.pt'} (step 1)\n"
            in capsys.readouterr().out)
    assert safe_load(out / "last.pt")["settings"]["decay_rel_pos_bias"] is False


def test_a_legacy_format_beit_checkpoint_still_gets_beits_recipe(beit_run, tmp_path, capsys):
    import yaml

    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(beit_run / "run" / "last.pt", weights_only=True), legacy,
               _use_new_zipfile_serialization=False)
    assert main(["finetune", "--pretrained", str(legacy), "--data", str(beit_run / "data"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["warmup_epochs"] == 20


# load_model of a finetuned BEiT in a process that imports no training code: its logits of the images saved beside it
_REBUILT = """
import sys
import torch
import lomar
torch.set_num_threads(int(sys.argv[3]))  # the test's: how many threads share a sum changes its last bits
model = lomar.load_model(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(torch.load(sys.argv[2], weights_only=True))
training = sorted(m for m in sys.modules if m.split(".")[:2] in (["lomar", "train"], ["lomar", "methods"],
                                                                 ["lomar", "cli"], ["lomar", "integrations"]))
assert not training, training
torch.save({"logits": logits}, sys.argv[2] + ".logits")
"""


@pytest.mark.slow  # a finetune, an evaluation, a python process
def test_a_finetuned_beit_is_rebuilt_by_load_model_as_eval_only_scores_it(beit_run, tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    from lomar.checkpoints.io import safe_load
    from lomar.train import finetune as finetune_module

    data, ft = beit_run / "data", tmp_path / "ft"
    assert main(["finetune", "--pretrained", str(beit_run / "run" / "last.pt"), "--data", str(data), "--img-size",
                 "32", "--batch-size", "4", "--workers", "0", "--threads", "1", "--device", "cpu", "--precision",
                 "fp32", "--max-steps", "2", "--out", str(ft)]) == 0
    built, trained_classifier = [], finetune_module._trained_classifier
    monkeypatch.setattr(finetune_module, "_trained_classifier", lambda *a: built.append(trained_classifier(*a))
                        or built[-1])
    evaluate = ["finetune", "--eval-only", "--pretrained", str(ft), "--data", str(data), "--workers", "0",
                "--device", "cpu"]
    assert main([*evaluate, "--out", str(tmp_path / "ev")]) == 0, capsys.readouterr().err
    (scored, trained), = built
    assert trained == 32 and json.loads((tmp_path / "ev" / "metrics.jsonl").read_text())["top1"] in (0, 0.25, 0.5,
                                                                                                    0.75, 1)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(images, tmp_path / "images.pt")
    subprocess.run([sys.executable, "-c", _REBUILT, str(ft / "best.pt"), str(tmp_path / "images.pt"),
                    str(torch.get_num_threads())], check=True)
    with torch.no_grad():
        expected = scored.eval()(images)
    assert expected.shape == (2, 2) and torch.equal(safe_load(tmp_path / "images.pt.logits")["logits"], expected)
    # one saved before its model spec: rebuilt from the BEiTConfig, head and pooling it kept, alike
    older = safe_load(ft / "best.pt")
    assert older.pop("model_spec")["arch"] == "lomar.models.beit_classifier:BEiTClassifier"
    torch.save(older, tmp_path / "older.pt")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "older.pt").eval()(images), expected)
    # its relative position tables fix its size: another is refused in one line
    capsys.readouterr()
    assert main([*evaluate, "--out", str(tmp_path / "at48"), "--img-size", "48"]) == 2
    assert capsys.readouterr().err == (f"lomar finetune: error: --img-size 48: {ft / 'best.pt'} is a finetuned BEiT "
                                       f"classifier, scored at its trained 32 px (its relative position tables fix "
                                       f"it); drop --img-size\n")
    # nor does it take another attention: named by its flag
    assert main([*evaluate, "--out", str(tmp_path / "dense"), "--attention", "dense"]) == 2
    assert capsys.readouterr().err == (f"lomar finetune: error: --attention dense: {ft / 'best.pt'} is a finetuned "
                                       f"BEiT classifier, whose timm attention computes its relative position bias "
                                       f"itself; drop --attention\n")
    # lomar predict runs it as any classifier
    assert main(["predict", str(ft), str(data / "val"), "--out", str(tmp_path / "pred"), "--device", "cpu",
                 "--workers", "0"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({top["class"] for top in row["top_k"]} == {"a", "b"} for row in rows)
    # timm's Beit: no encoder export holds it, no attention figure reads it; each refused in one line
    capsys.readouterr()
    best = str(ft / "best.pt")
    for command, words in ((["export", best, "--to", str(tmp_path / "ex")], "which an export (one encoder) does not "
                            "hold"), (["visualize", best, "--attention", "--out", str(tmp_path / "v")],
                                      "whose attention no figure here reads")):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "BEiT pretraining checkpoint" in err, err
