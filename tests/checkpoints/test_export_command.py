"""`lomar export` and create_encoder on lomar's side: what an export folder holds and rebuilds (windows, classes,
method, position tables), and the inputs they refuse."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from export_models import TINY, WINDOWED, X, _perturb

from helpers import pretrain, write_images
from lomar import LoMaR, VisionTransformer, ViTConfig, create_encoder, export_encoder, load_original
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.formats import load_model
from lomar.checkpoints.io import atomic_save
from lomar.cli.app import main
from lomar.errors import UsageError
from lomar.eval.features import load_pretrained_encoder
from lomar.models.mae_window import MAEWindow

timm = pytest.importorskip("timm")
import timm.optim  # noqa: E402,F811  (not imported by `import timm`)

import lomar.integrations.timm  # noqa: E402,F401  (registers lomar_vit_* in timm)


def _windowed(num_classes: int = 0) -> tuple[VisionTransformer, VisionTransformer]:
    """A windowed encoder and the same weights with global attention (which must give other outputs)."""
    torch.manual_seed(2)
    ours = _perturb(VisionTransformer(WINDOWED, num_classes=num_classes))
    plain = VisionTransformer(replace(WINDOWED, window_size=0, global_blocks=()), num_classes=num_classes).eval()
    plain.load_state_dict(ours.state_dict())
    assert not torch.allclose(plain.forward_features(X), ours.forward_features(X), atol=1e-3)
    return ours, plain


def test_windowed_export_rebuilds_with_its_windows(tmp_path):
    ours, _ = _windowed()
    export_encoder(ours, tmp_path / "exp")
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    config["attention"] = "flex"  # the exporting machine's choice (CUDA): recorded, not imposed
    (tmp_path / "exp" / "config.json").write_text(json.dumps(config))
    assert config["model_args"]["window_size"] == 4 and config["model_args"]["global_blocks"] == [1]
    rebuilt = [create_encoder(tmp_path / "exp"), load_model(tmp_path / "exp"),
               timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True)]
    want = ours.forward_features(X)
    for model in rebuilt:
        assert (model.config.window_size, model.config.global_blocks, model.config.attention) == (4, (1,), "auto")
        assert torch.equal(model.eval().forward_features(X), want)
    # the command line's --window-size is LoMaR's K: it does not re-window an export, and is not dropped unsaid
    with pytest.raises(ValueError, match=r"exp is an exported encoder, no pretraining model; drop window_size=7 "
                                         r"\(LoMaR's window size\)"):
        load_model(tmp_path / "exp", window_size=7)


def test_plain_export_config_has_no_window_args(tmp_path):
    export_encoder(VisionTransformer(TINY), tmp_path / "exp")
    assert not {"window_size", "global_blocks", "attention"} & set(
        json.loads((tmp_path / "exp" / "config.json").read_text())["model_args"])


@pytest.mark.parametrize("layout", ["finetune", "classifier"])
def test_windowed_classifier_checkpoint_exports_its_windows(tmp_path, layout):
    ours, _ = _windowed(num_classes=3)
    if layout == "finetune":  # what `lomar finetune` writes to best.pt / last.pt
        ckpt = {"model": ours.state_dict(), "config": ours.config.to_dict(), "num_classes": 3,
                "classes": ["a", "b", "c"], "format": "lomar-finetune-1", "global_pool": "avg"}
    else:
        ckpt = pretrain_checkpoint(ours)
    atomic_save(ckpt, tmp_path / "best.pt")
    assert main(["export", str(tmp_path / "best.pt"), "--to", str(tmp_path / "exp")]) == 0
    m = timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True).eval()
    for model in (load_model(tmp_path / "best.pt"), create_encoder(tmp_path / "exp"), m):
        assert torch.equal(model.eval()(X), ours(X))


def test_a_finetuned_classifiers_export_names_its_classes_so_its_head_is_kept_only_for_them(tmp_path, capsys):
    """Row i of a head is its i-th class: `lomar export` writes a finetune checkpoint's class names (timm's
    label_names), so --pretrained EXPORT over as many other classes starts a fresh head and says so, as the
    checkpoint itself does; the same classes in another order keep it, rows in the data's order. An export without
    names (an older one) keeps a head of the same size; names that cannot be the rows' are refused in one line."""
    torch.manual_seed(0)
    ours = _perturb(VisionTransformer(TINY, num_classes=3)).eval()
    atomic_save({"model": ours.state_dict(), "config": ours.config.to_dict(), "num_classes": 3,
                 "classes": ["cat", "dog", "owl"], "format": "lomar-finetune-1", "global_pool": "avg"},
                tmp_path / "best.pt")
    exp = tmp_path / "exp"
    assert main(["export", str(tmp_path / "best.pt"), "--to", str(exp)]) == 0
    config = json.loads((exp / "config.json").read_text())
    assert config["label_names"] == ["cat", "dog", "owl"]
    assert timm.create_model(f"local-dir:{exp}", pretrained=True).pretrained_cfg["label_names"] == config["label_names"]
    other = load_pretrained_encoder(exp, num_classes=3, classes=["ant", "bee", "cat"])
    assert other.load_report.fresh == ["head.weight", "head.bias"] and "initialised afresh" in (
        other.load_report.summary())
    shuffled = load_pretrained_encoder(exp, num_classes=3, classes=["owl", "cat", "dog"]).eval()
    torch.testing.assert_close(shuffled(X), ours(X)[:, [2, 0, 1]])
    assert main(["export", str(exp), "--to", str(tmp_path / "again")]) == 0  # an export's export keeps them
    assert json.loads((tmp_path / "again" / "config.json").read_text())["label_names"] == config["label_names"]
    assert main(["export", str(tmp_path / "best.pt"), "--to", str(tmp_path / "plain"), "--drop-head"]) == 0
    assert "label_names" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    del config["label_names"]  # an export written without them reads as it always did
    (exp / "config.json").write_text(json.dumps(config))
    assert load_pretrained_encoder(exp, num_classes=3, classes=["ant", "bee", "cat"]).load_report.fresh == []
    (exp / "config.json").write_text(json.dumps({**config, "label_names": ["cat", "dog"]}))
    with pytest.raises(UsageError, match=r"config.json: label_names name 2 classes for a head of 3; re-export"):
        create_encoder(exp)
    capsys.readouterr()
    assert main(["export", str(exp), "--to", str(tmp_path / "refused")]) == 2
    assert "label_names name 2 classes for a head of 3" in capsys.readouterr().err


def test_a_finetune_checkpoint_in_torchs_legacy_format_exports_its_class_names_too(tmp_path):
    """Such a file cannot be mapped: its names are read from it whole, not left out (its export's head would then be
    kept for any classes as many)."""
    ours = VisionTransformer(TINY, num_classes=2)
    torch.save({"model": ours.state_dict(), "config": ours.config.to_dict(), "num_classes": 2, "classes": ["a", "b"],
                "format": "lomar-finetune-1"}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert main(["export", str(tmp_path / "legacy.pt"), "--to", str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["label_names"] == ["a", "b"]


@pytest.mark.slow
def test_import_lomar_does_not_import_timm():
    code = "import sys, lomar, lomar.cli.app; lomar.cli.app.build_parser(); sys.exit('timm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_trained_position_table_is_interpolated_for_another_size(tmp_path):
    """A finetuned MAE encoder's table is trained, not sin-cos: at another --img-size it is resampled, not
    replaced."""
    ours = VisionTransformer(replace(TINY, pos="abs"))
    with torch.no_grad():
        ours.pos_embed.normal_()
    export_encoder(ours, tmp_path / "abs")
    wider = timm.create_model(f"local-dir:{tmp_path / 'abs'}", pretrained=True, img_size=2 * TINY.img_size)
    grid = [2 * g for g in ours.grid]
    expected = timm.layers.resample_abs_pos_embed(ours.pos_embed.detach(), grid, antialias=False)
    torch.testing.assert_close(wider.pos_embed.detach(), expected)
    assert wider.pos_embed.requires_grad  # trained in finetuning, as timm's and MAE's


def test_create_encoder_fits_an_absolute_table_to_another_img_size_as_timm_does(tmp_path):
    from lomar.models.abs_pos import sincos_pos_embed_2d

    ours = VisionTransformer(replace(TINY, pos="abs"))
    with torch.no_grad():
        ours.pos_embed.normal_()
    export_encoder(ours, tmp_path / "abs")
    wider = create_encoder(tmp_path / "abs", img_size=2 * TINY.img_size)
    timms = timm.create_model(f"local-dir:{tmp_path / 'abs'}", pretrained=True, img_size=2 * TINY.img_size)
    assert torch.equal(wider.pos_embed, timms.pos_embed)
    wide = VisionTransformer(ViTConfig(img_size=(16, 64), patch_size=8, embed_dim=32, depth=2, num_heads=2, pos="abs"))
    export_encoder(wide, tmp_path / "wide")  # fixed sin-cos of a 2x8 grid: resampled from it, as a trained table
    table = create_encoder(tmp_path / "wide", img_size=[32, 128]).pos_embed.detach()
    torch.testing.assert_close(table, timm.layers.resample_abs_pos_embed(sincos_pos_embed_2d(32, (2, 8))[None],
                                                                         [4, 16], [2, 8], antialias=False))
    assert not torch.allclose(table, sincos_pos_embed_2d(32, (4, 16))[None], atol=1e-3)  # not the new grid's sin-cos


def test_weights_with_nan_are_refused_by_create_encoder_and_load_original(tmp_path):
    from safetensors.torch import load_file, save_file

    from lomar.checkpoints.keys import lomar_to_original

    ours = VisionTransformer(TINY)
    export_encoder(ours, tmp_path / "exp")
    state = load_file(str(tmp_path / "exp" / "model.safetensors"))
    state["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "exp" / "model.safetensors"))
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2.weight holds NaN"):
        create_encoder(tmp_path / "exp")
    model = LoMaR(TINY, 3, 2)
    original = lomar_to_original(model.state_dict())
    original["blocks.0.attn.qkv.weight"][1, 1] = float("inf")
    torch.save({"model": original}, tmp_path / "orig.pth")
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight holds NaN or infinite"):
        load_original(tmp_path / "orig.pth", window_size=3, num_windows=2)


def test_a_dense_tasks_relative_position_term_is_not_exported(tmp_path):
    """timm's ViT has no place for ViTDet's or mmsegmentation's term: refused on the way out and on the way in."""
    from lomar.errors import UsageError

    detector_encoder = VisionTransformer(replace(TINY, pos="abs", rel_pos="decomposed"))
    with pytest.raises(ValueError, match="carries a dense task's relative position term"):
        export_encoder(detector_encoder, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    export_encoder(VisionTransformer(replace(TINY, pos="abs")), tmp_path / "mae")
    config = json.loads((tmp_path / "mae" / "config.json").read_text())
    (tmp_path / "mae" / "config.json").write_text(json.dumps({**config, "rel_pos": "bias"}))
    with pytest.raises(UsageError, match="rel_pos must be 'none' in an export"):
        create_encoder(tmp_path / "mae")


def test_create_encoder_given_a_checkpoint_file_says_it_is_not_a_folder(tmp_path):
    # It said "ckpt.pt/config.json not found; export an encoder with `lomar export` first".
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match=r"ckpt.pt is a file, not an export folder .*lomar\.load_model"):
        create_encoder(checkpoint)


def test_export_encoder_given_a_beit_names_beits_own_writer(tmp_path):
    from lomar.checkpoints.export_beit import export_beit_encoder
    from lomar.models.beit import BEiT, BEiTConfig
    from lomar.models.beit_pretrain import BEiTPretrain
    from lomar.tokenizers.kmeans import KMeansTokenizer

    config = BEiTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, vocab_size=4)
    beit, tokenizer = BEiT(config), KMeansTokenizer(torch.randn(4, 192), patch=8, input_size=32)
    for model, held in ((beit, "model"), (BEiTPretrain(config, tokenizer, 3, 1), "model.beit")):
        with pytest.raises(TypeError, match=rf"got {type(model).__name__}; export a BEiT with "
                                            rf"lomar\.checkpoints\.export_beit\.export_beit_encoder\({held}, DIR\)"):
            export_encoder(model, tmp_path / "ex")
    assert (export_beit_encoder(beit, tmp_path / "ex") / "config.json").is_file()  # the writer named takes it


def test_export_paths_that_are_no_folder_are_named_for_the_python_caller(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"file is a file, not a folder: an export is a folder"):
        export_encoder(VisionTransformer(TINY), tmp_path / "file")  # not mkdir's "[Errno 17] File exists"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config.json not found; export an encoder first "
                                                r"\(lomar.export_encoder, or `lomar export`\)$"):
        create_encoder(tmp_path / "empty")


def test_an_mae_run_with_windows_exports_under_the_method_it_was_trained_with(tmp_path, capsys):
    """Its method read 'maewindow' (the model's class) in the output line and config.json."""
    model = MAEWindow(replace(TINY, pos="abs"), window_size=2, num_windows=3, decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=2)
    atomic_save(pretrain_checkpoint(model), tmp_path / "last.pt")
    assert main(["export", str(tmp_path / "last.pt"), "--to", str(tmp_path / "exp")]) == 0
    assert f"-block encoder of {tmp_path / 'last.pt'} (mae, 3 windows) -> " in capsys.readouterr().out
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert (config["method"], config["windows"]) == ("mae", 3)


def test_pretrains_own_export_and_lomar_export_of_its_last_checkpoint_name_the_method_alike(tmp_path, monkeypatch):
    """pretrain's final export of `--method mae --windows 2` wrote 'method': 'mae' without the 'windows' that
    `lomar export` of its last.pt writes: one run, two descriptions."""
    from lomar.train.pretrain import PretrainTask

    monkeypatch.setattr(PretrainTask, "figure", lambda self, model=None: None)  # most of the run's time, not asked
    images = write_images(tmp_path / "imgs", 4, size=(32, 32))
    assert pretrain("--data", str(images), "--out", str(tmp_path / "run"), "--method", "mae", "--max-steps", "1",
                    "--decoder-embed-dim", "16", "--decoder-depth", "1", "--decoder-num-heads", "2") == 0
    assert main(["export", str(tmp_path / "run" / "last.pt"), "--to", str(tmp_path / "exp")]) == 0
    ours, theirs = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("run", "exp"))
    assert {k: ours.get(k) for k in ("method", "windows")} == {k: theirs.get(k) for k in ("method", "windows")}
    assert (ours["method"], ours["windows"], ours["step"]) == ("mae", 2, 1)


def test_every_loader_resamples_an_mae_export_at_another_size_as_its_forward_does(tmp_path):
    """One rule for an absolute table at another size, MAE's fixed sin-cos included: bicubic from the exported
    grid (MAE's finetuning, timm), as the encoder built at the export size does when run at that size: no loader
    builds the new grid's exact sin-cos instead (create_encoder, load_model, timm, a saved detector), reads the 2x8
    table as 4x4 (load_pretrained_encoder), or keeps the table as it is for a transposed grid of as many tokens."""
    from lomar.eval.features import load_pretrained_encoder
    from lomar.train.detect import _fit_to_layout

    mae = _perturb(VisionTransformer(ViTConfig(img_size=(16, 64), patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                               pos="abs")))  # 2x8: 16 tokens, which a square reading takes for 4x4
    export_encoder(mae, tmp_path / "mae")
    atomic_save({"model": mae.state_dict(), "config": mae.config.to_dict()}, tmp_path / "finetune.pt")
    args = json.loads((tmp_path / "mae" / "config.json").read_text())["model_args"]

    def detector(size):  # a saved detector's encoder weights, read for a detector at another size
        det = torch.nn.Module()
        det.backbone = torch.nn.Module()
        det.backbone.encoder = VisionTransformer(replace(mae.config, img_size=size))
        det.load_state_dict(_fit_to_layout({f"backbone.encoder.{k}": v for k, v in mae.state_dict().items()}, det,
                                           mae.config))
        return det.backbone.encoder

    loaders = {"load_pretrained_encoder": lambda size: load_pretrained_encoder(tmp_path / "mae", img_size=size),
               "create_encoder": lambda size: create_encoder(tmp_path / "mae", img_size=size),
               "load_model": lambda size: load_model(tmp_path / "mae", img_size=size),
               "load_model, finetune checkpoint": lambda size: load_model(tmp_path / "finetune.pt", img_size=size),
               "timm local-dir": lambda size: timm.create_model(f"local-dir:{tmp_path / 'mae'}", pretrained=True,
                                                                img_size=size),
               "timm overlay": lambda size: timm.create_model(
                   "lomar_vit_tiny_patch8", pretrained=True, **{**args, "img_size": size},
                   pretrained_cfg_overlay=dict(file=str(tmp_path / "mae" / "model.safetensors"))),
               "saved detector": detector}
    for size in ((24, 40), (64, 16)):  # another grid; the transposed one, of as many tokens
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = mae.forward_features(x)
            for name, load in loaders.items():
                torch.testing.assert_close(load(size).eval().forward_features(x), expected, msg=f"{name} at {size}")
