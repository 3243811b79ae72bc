"""`lomar export`, create_encoder and the timm registration (the one test module importing timm)."""

import ast
import errno
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import dead_pid, no_flock, pretrain, reference_dir, write_images
from lomar import LoMaR, VisionTransformer, ViTConfig, create_encoder, export_encoder, load_original, model_config
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.formats import load_model
from lomar.checkpoints.io import atomic_save
from lomar.checkpoints.keys import lomar_to_original
from lomar.cli.app import main
from lomar.errors import UsageError
from lomar.eval.features import load_pretrained_encoder
from lomar.models.mae_window import MAEWindow

timm = pytest.importorskip("timm")
import timm.optim  # noqa: E402,F811  (not imported by `import timm`)

import lomar.integrations.timm  # noqa: E402,F401  (registers lomar_vit_* in timm)

TINY = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2)
# ViTDet layout: block 0 attends inside 4x4 tiles of X's 8x12 grid, block 1 globally
WINDOWED = ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4, global_blocks=(1,))
X = torch.randn(2, 3, 64, 96)  # not the pretraining size: RPE needs no interpolation


def _perturb(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial RPE tables and cls token, so that every part of the encoder matters."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("rpe.table", "cls_token", "mask_token")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return module.eval()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny LoMaR written as our pretraining checkpoint, and its export."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = _perturb(LoMaR(TINY, window_size=3, num_windows=2))
    atomic_save(pretrain_checkpoint(model), root / "last.pt")
    assert main(["export", str(root / "last.pt"), "--to", str(root / "exp")]) == 0
    return model, root


def test_export_round_trip(pretrained):
    model, root = pretrained
    config = json.loads((root / "exp" / "config.json").read_text())
    assert config["architecture"] == "lomar_vit_tiny_patch16" and config["model_args"]["embed_dim"] == 32
    encoder = create_encoder(root / "exp").eval()
    assert encoder.state_dict().keys() == model.encoder.state_dict().keys()
    assert torch.equal(encoder.forward_features(X), model.encoder.forward_features(X))


def test_each_line_an_export_prints_names_its_command(pretrained, tmp_path, capsys):
    assert main(["export", str(pretrained[1] / "last.pt"), "--to", str(tmp_path / "exp")]) == 0
    lines = capsys.readouterr().out.splitlines()  # as its errors do: 'lomar export: error: ...'
    assert [line.split(": ", 1)[0] for line in lines] == ["lomar export", "lomar export"], lines


def test_the_lines_to_copy_after_an_export_keep_an_odd_path_one_argument(pretrained, tmp_path, capsys):
    """The Python of its 'load with' line reads back the folder as it is, with a space and a quote in its name."""
    out = tmp_path / "it's mine"
    assert main(["export", str(pretrained[1] / "last.pt"), "--to", str(out)]) == 0
    load = capsys.readouterr().out.splitlines()[-1]
    calls = re.fullmatch(r"lomar export: load with lomar\.create_encoder\((.*)\) or, after `import "
                         r"lomar\.timm_models`, timm\.create_model\((.*), pretrained=True\)", load)
    assert calls and [ast.literal_eval(arg) for arg in calls.groups()] == [str(out), f"local-dir:{out}"], load


def test_export_refuses_to_overwrite_and_bad_input(pretrained, tmp_path, capsys):
    _, root = pretrained
    assert main(["export", str(root / "last.pt"), "--to", str(root / "exp")]) == 2
    assert main(["export", str(tmp_path / "missing.pt"), "--to", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_timm_round_trip_identical_features(pretrained):
    model, root = pretrained
    ours = model.encoder
    named = timm.create_model("lomar_vit_tiny_patch16", pretrained=True, embed_dim=32, depth=2, num_heads=2,
                              img_size=64, pretrained_cfg_overlay=dict(file=str(root / "exp" / "model.safetensors")))
    local = timm.create_model(f"local-dir:{root / 'exp'}", pretrained=True)
    for m in (named.eval(), local.eval()):
        assert isinstance(m, lomar.integrations.timm.LomarVisionTransformer)
        assert m.num_classes == 0 and m.num_features == 32 and m.pretrained_cfg["num_classes"] == 0
        feats = m.forward_features(X)
        assert feats.shape == (2, 1 + 4 * 6, 32)
        assert torch.equal(feats, ours.forward_features(X))
        assert torch.equal(m(X), ours(X))  # mean of normed patch tokens
        assert torch.equal(m.forward_head(feats, pre_logits=True), ours(X))


def test_timm_forward_intermediates_and_features_only(pretrained):
    _, root = pretrained
    m = timm.create_model(f"local-dir:{root / 'exp'}", pretrained=True).eval()
    final, maps = m.forward_intermediates(X, indices=[0, -1])
    assert torch.equal(final, m.forward_features(X))
    assert [tuple(t.shape) for t in maps] == [(2, 32, 4, 6)] * 2
    tokens = m.forward_intermediates(X, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
    assert torch.equal(tokens[0], final[:, 1:])
    with_cls = m.forward_intermediates(X, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert with_cls[0][1].shape == (2, 1, 32)
    features = timm.create_model(f"local-dir:{root / 'exp'}", pretrained=True, features_only=True,
                                 out_indices=(0, 1)).eval()
    assert [tuple(t.shape) for t in features(X)] == [(2, 32, 4, 6)] * 2
    assert features.feature_info.reduction() == [16, 16]


def test_timm_classifier_matches_ours(tmp_path):
    torch.manual_seed(1)
    ours = _perturb(VisionTransformer(TINY, num_classes=5))
    with torch.no_grad():
        ours.head.weight.normal_()
    export_encoder(ours, tmp_path / "cls")
    m = timm.create_model(f"local-dir:{tmp_path / 'cls'}", pretrained=True).eval()
    assert m.num_classes == 5 and isinstance(m.norm, torch.nn.Identity)  # fc_norm after pooling
    assert torch.equal(m(X), ours(X))
    m.reset_classifier(3)
    assert m(X).shape == (2, 3) and m.get_classifier().out_features == 3
    # a pretrained encoder with a new head: the head and fc_norm start fresh
    fresh = timm.create_model(f"local-dir:{tmp_path / 'cls'}", pretrained=True, num_classes=7)
    assert fresh(X).shape == (2, 7)
    groups = timm.optim.create_optimizer_v2(fresh, "adamw", lr=1e-3, layer_decay=0.75)
    assert len(groups.param_groups) > 2


def test_a_classifiers_model_args_name_its_head_as_timms_own_exports_do(tmp_path):
    """timm's save_for_hf writes num_classes into model_args (its reconstruction arguments) too: a build from an
    export's architecture and model_args alone had no head, so the weights' head.* were unexpected keys. An export
    written without it (older) loads as it always did."""
    from safetensors.torch import load_file

    torch.manual_seed(1)
    ours = _perturb(VisionTransformer(TINY, num_classes=5, global_pool="cls"))
    export_encoder(ours, tmp_path / "cls")
    config = json.loads((tmp_path / "cls" / "config.json").read_text())
    assert config["model_args"]["num_classes"] == 5 and config["model_args"]["global_pool"] == "token"
    rebuilt = timm.create_model(config["architecture"], **config["model_args"]).eval()
    rebuilt.load_state_dict(load_file(str(tmp_path / "cls" / "model.safetensors")))
    assert torch.equal(rebuilt(X), ours(X))
    del config["model_args"]["num_classes"]
    (tmp_path / "cls" / "config.json").write_text(json.dumps(config))
    local = timm.create_model(f"local-dir:{tmp_path / 'cls'}", pretrained=True)
    for older in (create_encoder(tmp_path / "cls"), local):
        assert older.num_classes == 5 and torch.equal(older.eval()(X), ours(X))


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


def test_timm_reads_original_checkpoint():
    path = reference_dir() / "lomar_224_4win" / "checkpoint.pth"
    if not path.is_file():
        pytest.skip("reference checkpoint not available")
    encoder = load_original(path, num_heads=4).encoder.eval()
    m = timm.create_model("lomar_vit_tiny_patch16", pretrained=True, embed_dim=48, depth=2, num_heads=4,
                          pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert torch.equal(m.forward_features(X), encoder.forward_features(X))


def test_export_original_and_converted_agree(tmp_path):
    path = reference_dir() / "lomar_224_4win" / "checkpoint.pth"
    if not path.is_file():
        pytest.skip("reference checkpoint not available")
    assert main(["export", str(path), "--to", str(tmp_path / "a"), "--num-heads", "4"]) == 0
    assert main(["load-original", str(path), "--to", str(tmp_path / "c.pt"), "--num-heads", "4"]) == 0
    assert main(["export", str(tmp_path / "c.pt"), "--to", str(tmp_path / "b")]) == 0
    a, b = create_encoder(tmp_path / "a"), create_encoder(tmp_path / "b")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert isinstance(load_model(tmp_path / "c.pt"), LoMaR)


def test_load_original_names_a_window_that_does_not_fit_by_its_parameter_and_the_command_by_its_flag(
        tmp_path, capsys):
    model = LoMaR(model_config("vit_tiny_patch16", img_size=64, embed_dim=32, depth=1, num_heads=2), window_size=3,
                  num_windows=1)
    path = tmp_path / "orig.pth"
    torch.save({"model": lomar_to_original(model.state_dict()), "args": {"input_size": 64}}, path)
    with pytest.raises(ValueError) as info:
        load_original(path, window_size=5, num_heads=2)
    assert str(info.value) == ("window_size=5: a 5x5 window does not fit the 4x4 patch grid; pass window_size <= 4 "
                               "or use a larger image")
    assert main(["load-original", str(path), "--to", str(tmp_path / "c.pt"), "--num-heads", "2",
                 "--window-size", "5"]) == 2
    assert capsys.readouterr().err == ("lomar load-original: error: --window-size 5: a 5x5 window does not fit the "
                                       "4x4 patch grid; pass --window-size <= 4 or use a larger image\n")


def test_load_original_counts_a_single_block_and_head_as_one(tmp_path, capsys):
    model = LoMaR(model_config("vit_tiny_patch16", img_size=64, embed_dim=32, depth=1, num_heads=1), window_size=3,
                  num_windows=1)
    path = tmp_path / "orig.pth"
    torch.save({"model": lomar_to_original(model.state_dict()), "args": {"input_size": 64, "window_size": 3}}, path)
    assert main(["load-original", str(path), "--to", str(tmp_path / "c.pt"), "--num-heads", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"lomar load-original: converted {path} (lomar, 32 wide, 1 block, 1 head, patch 16, " in printed


def test_the_window_flags_default_to_the_checkpoints_own_as_their_help_says(tmp_path, capsys):
    """--window-size's and --windows' help said 'default: 7' and '4': an original checkpoint's args come first."""
    model = LoMaR(model_config("vit_tiny_patch16", img_size=64, embed_dim=32, depth=1, num_heads=1), window_size=3,
                  num_windows=2)
    path = tmp_path / "orig.pth"
    torch.save({"model": lomar_to_original(model.state_dict()),
                "args": {"input_size": 64, "window_size": 3, "num_window": 2}}, path)
    assert main(["load-original", str(path), "--to", str(tmp_path / "c.pt"), "--num-heads", "1"]) == 0
    converted = load_model(tmp_path / "c.pt")
    assert (converted.window_size, converted.num_windows) == (3, 2)
    assert main(["load-original", "--help"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "--window-size WINDOW_SIZE LoMaR window size K (default: the checkpoint's, else 7)" in printed
    assert "--windows NUM_WINDOWS LoMaR windows per image (default: the checkpoint's, else 4;" in printed


def test_an_image_size_that_does_not_tile_into_patches_is_named_by_its_flag_with_one_that_does(tmp_path, capsys):
    """The grid's own 'image size 70x70 is not divisible by the patch size 16' named no flag."""
    model = LoMaR(model_config("vit_tiny_patch16", img_size=64, embed_dim=32, depth=1, num_heads=2), window_size=3,
                  num_windows=1)
    path = tmp_path / "orig.pth"
    torch.save({"model": lomar_to_original(model.state_dict()), "args": {"input_size": 64, "window_size": 3}}, path)
    with pytest.raises(ValueError, match=r"^img_size=\(70, 64\) is not divisible by the checkpoint's patch size 16; "
                                         r"pass a multiple of 16, e.g. img_size=\(64, 64\)$"):
        load_original(path, num_heads=2, img_size=(70, 64))
    for size, fit in (("70", "64"), ("64 90", "64 80")):
        assert main(["export", str(path), "--to", str(tmp_path / "e"), "--num-heads", "2", "--img-size",
                     *size.split()]) == 2
        assert capsys.readouterr().err == (f"lomar export: error: --img-size {size} is not divisible by the "
                                           f"checkpoint's patch size 16; pass a multiple of 16, e.g. --img-size "
                                           f"{fit}\n")
    assert main(["export", str(path), "--to", str(tmp_path / "e"), "--num-heads", "2", "--img-size", "64", "80"]) == 0


@pytest.mark.slow
def test_import_lomar_does_not_import_timm():
    code = "import sys, lomar, lomar.cli.app; lomar.cli.app.build_parser(); sys.exit('timm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_trained_position_table_is_interpolated_for_another_size(tmp_path):
    """A finetuned MAE encoder's table is no longer sin-cos: at another --img-size it is resampled, not replaced."""
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


def test_a_cls_pooling_classifier_round_trips_through_lomar_and_timm(tmp_path):
    torch.manual_seed(3)
    ours = _perturb(VisionTransformer(TINY, num_classes=5, global_pool="cls")).eval()
    export_encoder(ours, tmp_path / "cls")
    assert json.loads((tmp_path / "cls" / "config.json").read_text())["global_pool"] == "cls"
    again = create_encoder(tmp_path / "cls").eval()
    assert again.global_pool == "cls" and torch.equal(again(X), ours(X))
    timm_model = timm.create_model(f"local-dir:{tmp_path / 'cls'}", pretrained=True).eval()
    torch.testing.assert_close(timm_model(X), ours(X))
    plain = create_encoder(tmp_path / "cls", num_classes=0)  # the encoder alone keeps its final norm
    torch.testing.assert_close(plain.forward_features(X), ours.forward_features(X))
    with pytest.raises(ValueError, match="unknown encoder setting.*num_class;"):
        create_encoder(tmp_path / "cls", num_class=3)


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


def test_timm_weights_of_a_shallower_export_name_what_they_lack(tmp_path):
    export_encoder(VisionTransformer(replace(TINY, depth=1)), tmp_path / "one")
    with pytest.raises(ValueError, match="the weights lack blocks.1.norm1.weight.*see config.json's model_args"):
        timm.create_model("lomar_vit_tiny_patch16", pretrained=True, embed_dim=32, depth=2, num_heads=2, img_size=64,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "one" / "model.safetensors")))


def test_timm_adapts_the_stem_of_pretrained_weights_to_other_input_channels(pretrained):
    """timm's in_chans=1 sums an RGB stem over its channels (load_pretrained, after the filter); the filter refused
    the 3-channel weight, telling the user to create the model with the exported architecture."""
    model, root = pretrained
    gray = timm.create_model(f"local-dir:{root / 'exp'}", pretrained=True, in_chans=1).eval()
    stem = model.encoder.patch_embed.proj.weight
    assert torch.allclose(gray.patch_embed.proj.weight, stem.sum(1, keepdim=True))
    assert torch.allclose(gray(X[:, :1]), model.encoder(X[:, :1].expand(-1, 3, -1, -1)), atol=1e-5)


def test_features_only_takes_every_block_of_an_encoder_shallower_than_three():
    model = timm.create_model("lomar_vit_tiny_patch16", features_only=True, depth=2, embed_dim=32, num_heads=2,
                              img_size=64)
    assert [tuple(f.shape) for f in model(torch.randn(1, 3, 64, 64))] == [(1, 32, 4, 4)] * 2


def test_timm_resamples_a_fixed_table_from_the_grid_it_names_and_loads_non_strictly_when_asked(tmp_path):
    wide = VisionTransformer(ViTConfig(img_size=(16, 64), patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                       pos="abs"))
    export_encoder(wide, tmp_path / "wide")  # a 2x8 grid: 16 tokens, which a square reading takes for 4x4
    resized = timm.create_model(f"local-dir:{tmp_path / 'wide'}", pretrained=True, img_size=(32, 128))
    torch.testing.assert_close(resized.pos_embed.detach(), wide.pos_embed_for((4, 16)))
    export_encoder(VisionTransformer(replace(TINY, depth=1)), tmp_path / "one")
    loose = timm.create_model("lomar_vit_tiny_patch16", pretrained=True, embed_dim=32, depth=2, num_heads=2,
                              img_size=64, pretrained_strict=False,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "one" / "model.safetensors")))
    assert len(loose.blocks) == 2


def test_timms_token_pooling_exports_as_cls_and_a_pooling_change_starts_a_fresh_head(tmp_path):
    torch.manual_seed(4)
    token = timm.create_model("lomar_vit_tiny_patch16", embed_dim=32, depth=2, num_heads=2, img_size=64,
                              num_classes=5, global_pool="token").eval()
    export_encoder(token, tmp_path / "token")
    assert json.loads((tmp_path / "token" / "config.json").read_text())["global_pool"] == "cls"
    torch.testing.assert_close(create_encoder(tmp_path / "token").eval()(X), token(X))
    with pytest.raises(ValueError, match="pooling by 'avg' or 'cls'"):
        export_encoder(timm.create_model("lomar_vit_tiny_patch16", embed_dim=32, depth=2, num_heads=2, img_size=64,
                                         num_classes=5, global_pool="max"), tmp_path / "max")
    exported = _exported_head(tmp_path / "token")
    for pool in ("avg", "cls"):
        rebuilt = create_encoder(tmp_path / "token", global_pool=pool)
        assert torch.equal(rebuilt.head.weight.detach(), exported) == (pool == "cls")  # the trained head fits cls only


def _exported_head(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))["head.weight"]


def test_timm_refuses_an_export_whose_model_args_ask_for_a_huge_image(pretrained, tmp_path):
    """timm builds from config.json's model_args alone: 100,000 px with an absolute table would be ~120 GB."""
    import shutil

    _, root = pretrained
    shutil.copytree(root / "exp", tmp_path / "exp")
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    config["model_args"]["img_size"] = 100_000  # an RPE encoder builds cheaply at any size: only the bound stops it
    (tmp_path / "exp" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"img_size must be at most 8192 \(lomar.limits.MAX_IMG_SIZE\), got 100000"):
        timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True)
    with pytest.raises(ValueError, match="img_size must be at most 8192"):
        ViTConfig(img_size=(16, 8208))
    assert ViTConfig(img_size=8192).img_size == 8192


def test_create_encoder_given_a_checkpoint_file_says_it_is_not_a_folder(tmp_path):
    # It said "ckpt.pt/config.json not found; export an encoder with `lomar export` first".
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match=r"ckpt.pt is a file, not an export folder .*formats\.load_model"):
        create_encoder(checkpoint)


def test_export_paths_that_are_no_folder_are_named_for_the_python_caller(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"file is a file, not a folder: an export is a folder"):
        export_encoder(VisionTransformer(TINY), tmp_path / "file")  # was mkdir's "[Errno 17] File exists"
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


def test_an_original_mae_exports_its_encoder_without_the_heads_of_a_decoder_it_does_not_write(tmp_path, capsys):
    """A decoder not 512 wide stopped the export with 'cannot infer the number of heads of the 64-wide MAE decoder;
    pass --decoder-num-heads N', though only the encoder is written; load-original, which writes the decoder, asks."""
    from lomar import MAE

    model = _perturb(MAE(replace(TINY, pos="abs"), decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4))
    original = {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}
    path = tmp_path / "mae.pth"
    torch.save({"model": original, "args": {"input_size": 64}}, path)
    assert main(["export", str(path), "--to", str(tmp_path / "exp"), "--num-heads", "2"]) == 0
    assert f"-block encoder of {path} (mae) -> " in capsys.readouterr().out
    exported, loaded = create_encoder(tmp_path / "exp"), load_original(path, num_heads=2, decoder_num_heads=4).encoder
    assert exported.config == loaded.config
    assert {k: v.tolist() for k, v in exported.state_dict().items()} == {
        k: v.tolist() for k, v in loaded.state_dict().items()}
    assert main(["load-original", str(path), "--to", str(tmp_path / "c.pt"), "--num-heads", "2"]) == 2
    assert "pass --decoder-num-heads N" in capsys.readouterr().err
    # the export's checks stay: --img-size names the size the table was trained at, and weights must be finite
    assert main(["export", str(path), "--to", str(tmp_path / "e2"), "--num-heads", "2", "--img-size", "128"]) == 2
    assert "pass --img-size 64, the size it was trained at" in capsys.readouterr().err
    original["blocks.0.attn.qkv.weight"][0, 0] = float("inf")
    torch.save({"model": original}, path)
    assert main(["export", str(path), "--to", str(tmp_path / "e3"), "--num-heads", "2"]) == 2
    assert "blocks.0.attn.qkv.weight holds NaN or infinite" in capsys.readouterr().err


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


def test_an_overwrite_that_fails_after_the_weights_leaves_the_old_export_whole(tmp_path, monkeypatch):
    """The weights and config.json were two separate renames: a failure between them left the new weights beside the
    old config.json, which rebuilds them with the old ViTDet window size (the same shapes: no check caught it)."""
    torch.manual_seed(0)
    before = VisionTransformer(WINDOWED).eval()
    export_encoder(before, tmp_path / "exp")
    rename, failed = os.replace, []

    def fail_once_at_config(src, dst):
        if Path(dst).name == "config.json" and not failed:
            failed.append(src)
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return rename(src, dst)

    monkeypatch.setattr(os, "replace", fail_once_at_config)
    with pytest.raises(OSError, match="Input/output error"):
        export_encoder(VisionTransformer(replace(WINDOWED, window_size=2)), tmp_path / "exp", overwrite=True)
    monkeypatch.undo()
    assert failed and sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["config.json", "model.safetensors"]
    after = create_encoder(tmp_path / "exp").eval()
    assert after.config == before.config
    assert all(torch.equal(v, after.state_dict()[k]) for k, v in before.state_dict().items())


def test_a_failed_swap_never_shows_the_old_config_beside_the_new_weights_nor_leaves_a_first_exports(tmp_path,
                                                                                                      monkeypatch):
    """Putting the old pair back took config.json first: for an instant (for good, if the weights' return failed) the
    old config.json stood beside the new weights. A first export that failed at config.json left its weights."""
    export_encoder(VisionTransformer(WINDOWED), tmp_path / "exp")
    folder = tmp_path / "exp"
    old_pair = ((folder / "config.json").read_bytes(), (folder / "model.safetensors").read_bytes())
    rename, mixes = os.replace, []

    def fail_at_new_config(src, dst):
        if Path(dst).name == "config.json" and ".new-" in Path(src).name:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        rename(src, dst)
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            old_config = (folder / "config.json").read_bytes() == old_pair[0]
            if old_config != ((folder / "model.safetensors").read_bytes() == old_pair[1]):
                mixes.append(Path(dst).name)

    monkeypatch.setattr(os, "replace", fail_at_new_config)
    with pytest.raises(OSError, match="Input/output error"):
        export_encoder(VisionTransformer(replace(WINDOWED, window_size=2)), folder, overwrite=True)
    with pytest.raises(OSError, match="Input/output error"):
        export_encoder(VisionTransformer(WINDOWED), tmp_path / "first")
    monkeypatch.undo()
    assert mixes == []
    assert ((folder / "config.json").read_bytes(), (folder / "model.safetensors").read_bytes()) == old_pair
    assert list((tmp_path / "first").iterdir()) == []


def test_an_export_over_a_run_folder_removes_the_weights_its_old_config_named_and_no_other_file(tmp_path):
    """`lomar export RUN/last.pt --to RUN --overwrite` left pretrain's encoder.safetensors beside the new
    model.safetensors: read directly, it was taken without its config.json (its ViTDet windows)."""
    model = LoMaR(WINDOWED, window_size=3, num_windows=2)
    atomic_save(pretrain_checkpoint(model), tmp_path / "last.pt")
    export_encoder(model.encoder, tmp_path, weights_name="encoder.safetensors", metadata={"method": "lomar"})
    assert main(["export", str(tmp_path / "last.pt"), "--to", str(tmp_path), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "last.pt", "model.safetensors"]
    # a config.json edited to name a checkpoint (or the tokenizer) never takes it along
    for name in ("last.pt", "tokenizer.safetensors"):
        (tmp_path / "tokenizer.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "weights": name}))
        export_encoder(model.encoder, tmp_path, overwrite=True)
        assert (tmp_path / "last.pt").is_file() and (tmp_path / "tokenizer.safetensors").is_file()


def test_lomar_export_refuses_a_folder_another_export_wrote_while_it_loaded(pretrained, tmp_path, monkeypatch,
                                                                           capsys):
    """`lomar export` without --overwrite looked at --to only before loading its checkpoint: an export into the folder
    that ended meanwhile was replaced, rc 0. It looks again under the folder's lock, held through the write."""
    from lomar.cli import export as cli_export

    _, root = pretrained
    load = cli_export.load_for_cli

    def load_while_another_exports(*args, **kwargs):
        found = load(*args, **kwargs)
        export_encoder(VisionTransformer(TINY), tmp_path)
        return found

    monkeypatch.setattr(cli_export, "load_for_cli", load_while_another_exports)
    assert main(["export", str(root / "last.pt"), "--to", str(tmp_path)]) == 2  # not 0: refused
    assert capsys.readouterr().err.strip() == (f"lomar export: error: {tmp_path / 'model.safetensors'} already exists; "
                                               f"pass --overwrite to replace it, or another --to")
    assert "source" not in json.loads((tmp_path / "config.json").read_text())  # the other export's, kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_the_next_export_removes_what_a_killed_one_left_but_not_a_live_ones(tmp_path, monkeypatch, caplog):
    """A kill between write_export's renames leaves .NAME.old-TAG / .NAME.new-TAG files (and atomic_write's temporary)
    that the next export removes. Under the folder's export lock no other export is writing, so all are stale, also
    those whose PID is a live process here (another machine's export on a share, a PID reused); where
    the filesystem has no flock the export warns and keeps those of a live PID (one may be mid-swap) and those of
    another machine (whose PID says nothing here)."""
    from lomar.checkpoints.export_leftovers import writer_tag

    ended = dead_pid()
    host, token = writer_tag().split("-")[0], "0123456789abcdef"
    dead, live = (f"{host}-{pid}-{token}" for pid in (ended, os.getppid()))
    dead_elsewhere = f"node_b.cluster-{ended}-{token}"  # what a tag names a host 'node-b.cluster' by
    export_encoder(VisionTransformer(TINY), tmp_path)
    stale = [f".config.json.old-{dead}", f".model.safetensors.old-{dead}", f".encoder.safetensors.new-{dead}",
             f"..config.json.new-{dead}.tmp-7-{token}"]
    kept = [f".last.pt.old-{dead}", "last.pt"]
    alive = [f".config.json.new-{live}", f".config.json.old-{dead_elsewhere}"]
    for name in stale + kept + alive:
        (tmp_path / name).write_bytes(b"x")
    export_encoder(VisionTransformer(TINY), tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["config.json", "model.safetensors"])

    no_flock(monkeypatch)
    for name in stale + alive:
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level("WARNING", "lomar.checkpoints"):
        export_encoder(VisionTransformer(TINY), tmp_path, overwrite=True)
    assert f"{tmp_path}: no file lock there (No locks available); exporting unlocked" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + alive + ["config.json", "model.safetensors"])


def test_lomar_export_into_a_folder_without_flock_warns_once(tmp_path, monkeypatch, caplog):
    """`lomar export` holds the folder's lock around the write, which takes it again: where the filesystem has no
    flock, the two tries warn once between them, not the same words twice."""
    export_encoder(VisionTransformer(TINY), tmp_path / "src")

    no_flock(monkeypatch)
    with caplog.at_level("WARNING", "lomar.checkpoints"):
        assert main(["export", str(tmp_path / "src"), "--to", str(tmp_path / "out")]) == 0
    assert [r.getMessage() for r in caplog.records if "no file lock" in r.getMessage()] == [  # once
        f"{tmp_path / 'out'}: no file lock there (No locks available); exporting unlocked: run no other export into "
        f"it meanwhile"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def _export_pausing(model: VisionTransformer, folder: Path, ready, pause_s: float) -> None:
    """Export ``model`` into ``folder``, pausing once its weights are renamed in and before its config.json is: where
    another export's pair, put in meanwhile, would end beside the wrong file."""
    rename = os.replace

    def rename_then_pause(src, dst):
        rename(src, dst)
        if Path(dst).name == "model.safetensors" and ".new-" in Path(src).name:
            ready.set()
            time.sleep(pause_s)

    os.replace = rename_then_pause
    export_encoder(model, folder, overwrite=True)


def _pausing_export(model: VisionTransformer, folder: Path, pause_s: float):
    context = multiprocessing.get_context("fork")  # the model as it is, without a new interpreter's imports
    ready = context.Event()
    child = context.Process(target=_export_pausing, args=(model, folder, ready, pause_s))
    child.start()
    assert ready.wait(20), "the child export never reached its pause"
    return child


def test_two_exports_into_one_folder_at_once_take_turns_and_leave_one_whole_export(tmp_path):
    """Nothing locked an export's folder: a second export whose pair went in while the first was between its two
    renames left the first's config.json (2 blocks) beside the second's weights (1 block), unreadable. It waits for
    the first to end, then replaces its export whole."""
    first, second = VisionTransformer(TINY), _perturb(VisionTransformer(replace(TINY, depth=1)))
    child = _pausing_export(first, tmp_path, pause_s=1.0)
    export_encoder(second, tmp_path, overwrite=True)
    child.join(20)
    assert child.exitcode == 0
    assert json.loads((tmp_path / "config.json").read_text())["depth"] == 1  # the second's, not the first's 2
    loaded = create_encoder(tmp_path)  # weights and config.json of one export: no UsageError
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in second.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no lock file left


def test_an_export_waits_for_another_users_export_whose_lock_file_it_cannot_write(tmp_path, monkeypatch):
    """Another user's lock file (made 0644) cannot be opened for writing: the export went on unlocked and said nothing,
    its pair going in while theirs was between its renames (their config.json beside its weights). flock needs no
    write access: it waits for theirs as for its own user's, and a file it cannot remove stays, the export done."""
    from lomar.checkpoints import file_lock

    first, second = VisionTransformer(TINY), _perturb(VisionTransformer(replace(TINY, depth=1)))
    child = _pausing_export(first, tmp_path, pause_s=1.0)
    opened, unlink = file_lock.open_in_place, Path.unlink

    def theirs(path, mode="r", **text):  # the file there is theirs; one this export makes is its own
        if "a" in mode and os.path.exists(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return opened(path, mode, **text)

    def kept_if_theirs(path, missing_ok=False):  # a sticky folder: another user's file stays
        if path.name == ".export.lock" and path.exists() and path.read_text() == "pid 1 on elsewhere":
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return unlink(path, missing_ok)

    monkeypatch.setattr(file_lock, "open_in_place", theirs)
    export_encoder(second, tmp_path, overwrite=True)
    child.join(20)
    assert child.exitcode == 0
    assert json.loads((tmp_path / "config.json").read_text())["depth"] == 1  # ours, not their 2
    loaded = create_encoder(tmp_path)  # weights and config.json of one export: no UsageError
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in second.state_dict().items())
    (tmp_path / ".export.lock").write_text("pid 1 on elsewhere")  # a killed export's, theirs, in a sticky folder
    monkeypatch.setattr(Path, "unlink", kept_if_theirs)
    export_encoder(first, tmp_path, overwrite=True)  # locked on their file, which it cannot remove: done all the same
    assert json.loads((tmp_path / "config.json").read_text())["depth"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.lock", "config.json", "model.safetensors"]


def test_an_export_waits_a_bounded_time_for_another_and_clears_a_killed_ones_leftovers(tmp_path, monkeypatch,
                                                                                       caplog):
    """An export into a folder another is writing waits LOCK_WAIT_S, then says in one line which folder and who
    writes it; once that writer is killed (mid-swap, its lock file left), the next export takes the folder and
    removes what it left, and a reader names them as an interrupted export's only then."""
    from lomar.checkpoints import export_leftovers
    from lomar.checkpoints.export_leftovers import interrupted_export

    export_encoder(VisionTransformer(TINY), tmp_path)
    child = _pausing_export(VisionTransformer(TINY), tmp_path, pause_s=60)
    try:
        assert not (tmp_path / "config.json").exists() and interrupted_export(tmp_path) == ""  # mid-swap: alive
        monkeypatch.setattr(export_leftovers, "LOCK_WAIT_S", 0.3)
        with pytest.raises(UsageError) as caught, caplog.at_level("WARNING", "lomar.checkpoints"):
            export_encoder(VisionTransformer(TINY), tmp_path, overwrite=True)  # waits, then refuses
        assert caplog.messages == [f"{tmp_path} is being written by another export (pid {child.pid} on "
                                   f"{socket.gethostname()}): waiting for it, up to 0.3 s"]  # once, as it starts
        assert str(caught.value) == (f"{tmp_path} is being written by another export (pid {child.pid} on "
                                     f"{socket.gethostname()}), waited for 0.3 s; export again once it ends, or export "
                                     f"to another folder")
    finally:
        child.kill()
        child.join(20)
    assert (tmp_path / ".export.lock").is_file()  # a killed holder's file: its lock went with it
    assert "an export into it was interrupted" in interrupted_export(tmp_path)
    model = _perturb(VisionTransformer(TINY))
    export_encoder(model, tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(create_encoder(tmp_path).cls_token, model.cls_token)


def test_the_pretrained_cfg_gives_timm_the_exported_input_size_and_lomars_eval_crop(tmp_path):
    """A non-square export wrote input_size [3, [64, 96], [64, 96]], on which timm's eval transform failed; a
    classifier above 224 px gave crop_pct 0.875 where `lomar finetune` scored it with the whole image (1.0)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    export_encoder(VisionTransformer(replace(TINY, img_size=(64, 96))), tmp_path / "wide")
    model = timm.create_model(f"local-dir:{tmp_path / 'wide'}", pretrained=True)
    transform = create_transform(**resolve_data_config(model=model))
    assert transform(Image.new("RGB", (150, 100))).shape == (3, 64, 96)
    crops = []
    for side, classes in ((224, 3), (256, 3), (256, 0)):
        folder = tmp_path / f"{side}-{classes}"
        export_encoder(VisionTransformer(replace(TINY, img_size=side), num_classes=classes), folder)
        crops.append(json.loads((folder / "config.json").read_text())["pretrained_cfg"]["crop_pct"])
    assert crops == [0.875, 1.0, 1.0]  # an encoder at 256 px: as knn and linprobe crop, finetune's rule


def test_a_beit_exports_pretrained_cfg_gives_timm_the_crop_lomar_scores_its_encoder_with(tmp_path):
    """A BEiT export said crop_pct 0.9, so timm's eval transform of it cropped otherwise than lomar knn / linprobe,
    which crop every encoder by eval_crop_ratio (1.0 at its 256 px), BEiT's too; it follows the one rule of the ViT
    exports."""
    from timm.data import resolve_data_config

    from lomar.checkpoints.export_beit import export_beit_encoder
    from lomar.models.beit import BEiT, BEiTConfig

    vit = tmp_path / "vit"
    export_encoder(VisionTransformer(replace(TINY, img_size=256)), vit)
    export_beit_encoder(BEiT(BEiTConfig(img_size=256, patch_size=64, embed_dim=32, depth=1, num_heads=2,
                                        vocab_size=16)), tmp_path / "beit")
    crops = [json.loads((folder / "config.json").read_text())["pretrained_cfg"] for folder in (vit, tmp_path / "beit")]
    assert crops[1]["crop_pct"] == crops[0]["crop_pct"] == 1.0  # lomar's eval crop at 256 px, not timm's BEiT 0.9
    model = timm.create_model(f"local-dir:{tmp_path / 'beit'}", pretrained=True)
    assert resolve_data_config(model=model)["crop_pct"] == 1.0


def test_a_one_channel_exports_pretrained_cfg_normalises_a_grey_image_for_timm(tmp_path):
    """An in_chans=1 export gave timm ImageNet's three means and stds, so its eval transform failed on a grey image (a
    broadcast error); one grey channel takes their mean, as timm's stem adaptation sums the RGB weights."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    export_encoder(VisionTransformer(replace(TINY, in_chans=1)), tmp_path / "grey")
    model = timm.create_model(f"local-dir:{tmp_path / 'grey'}", pretrained=True).eval()
    config = resolve_data_config(model=model)
    assert (config["mean"], config["std"]) == ([0.449], [0.226])
    image = create_transform(**config)(Image.new("L", (80, 70), 128))
    assert image.shape == (1, 64, 64) and torch.allclose(image, torch.full_like(image, (128 / 255 - 0.449) / 0.226))
    assert model(image[None]).shape == (1, 32)


def test_every_loader_resamples_an_mae_export_at_another_size_as_its_forward_does(tmp_path):
    """One rule for an absolute table at another size, MAE's fixed sin-cos included: bicubic from the exported
    grid (MAE's finetuning, timm), as the encoder built at the export size does when run at that size. Each loader
    built the new grid's exact sin-cos (create_encoder, load_model, timm, a saved detector) or read the 2x8 table
    as 4x4 (load_pretrained_encoder), and the transposed grid of as many tokens kept the table as it was."""
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


def test_timms_dynamic_img_size_is_taken_since_any_size_works():
    torch.manual_seed(0)
    plain = timm.create_model("lomar_vit_tiny_patch16", embed_dim=32, depth=1, num_heads=2, img_size=32, pos="abs")
    dynamic = timm.create_model("lomar_vit_tiny_patch16", embed_dim=32, depth=1, num_heads=2, img_size=32, pos="abs",
                                dynamic_img_size=True)  # TypeError before
    dynamic.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 48, 64)
    torch.testing.assert_close(dynamic.eval()(x), plain.eval()(x))
    assert dynamic.dynamic_img_size
