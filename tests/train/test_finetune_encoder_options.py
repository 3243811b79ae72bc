"""Finetuning options of the encoder: ViTDet-style windowed blocks (--window-size, --global-blocks), an MAE
encoder's position table trained (and a run that kept it fixed resumed so), and encoder flags noted where the term
they act on is missing."""

from __future__ import annotations

import pytest
import torch
from finetune_cli import _finetune

from lomar.checkpoints.io import safe_load
from lomar.cli.app import main
from lomar.eval.features import load_pretrained_encoder
from lomar.models.abs_pos import sincos_pos_embed_2d
from lomar.train import finetune as finetune_module


def test_window_size_finetunes_vitdet_blocks_and_keeps_them(tmp_path, capsys, pretrained, folder):
    from lomar.checkpoints.formats import load_model
    from lomar.models.attention import vitdet_global_blocks

    out = tmp_path / "run"
    assert _finetune(pretrained, folder, out, "--batch-size", "4", "--max-steps", "1", "--window-size", "2",
                     "--global-blocks", "1", "--attention", "chunked") == 0
    model = load_model(out / "last.pt")
    assert (model.config.window_size, model.config.global_blocks) == (2, (1,))
    plain = load_pretrained_encoder(pretrained, num_classes=2)
    plain.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 48)
    model.eval(), plain.eval()
    with torch.no_grad():  # the windows are in use: not the global-attention model with these weights
        assert not torch.allclose(model.forward_features(images), plain.forward_features(images), atol=1e-3)
    # without --global-blocks: ViTDet's layout for the encoder's depth
    encoder = load_pretrained_encoder(pretrained, window_size=2, global_blocks=None)
    assert encoder.config.global_blocks == vitdet_global_blocks(encoder.config.depth)
    capsys.readouterr()
    assert main(["finetune", "--out", str(out), "--resume", "auto", "--window-size", "0"]) == 2  # the recipe's
    assert "--window-size 0 differs from 2" in capsys.readouterr().err


def test_a_window_size_that_windows_no_block_is_said(tmp_path, capsys, pretrained, folder):
    """ViTDet's default global blocks (the last of each quarter) are every block of an encoder under 8 blocks deep:
    --window-size then changed nothing, without a word."""
    encoder = load_pretrained_encoder(pretrained, window_size=2, global_blocks=None)
    # the library's words are the Python caller's parameters, the command's its flags
    assert "window_size=2 windows no block: all 2 blocks attend globally (global_blocks=(0, 1)); give fewer global " \
           "blocks (global_blocks=(1,)) to window the others" in encoder.load_report.summary()
    assert "windows no block" not in load_pretrained_encoder(pretrained, window_size=2, global_blocks=(1,)) \
        .load_report.summary()
    assert _finetune(pretrained, folder, tmp_path / "run", "--batch-size", "4", "--max-steps", "1",
                     "--window-size", "2") == 0
    assert "--window-size 2 windows no block: all 2 blocks attend globally (--global-blocks 0 1); give fewer global " \
           "blocks (--global-blocks 1) to window the others" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--global-blocks", "1"], "--global-blocks needs --window-size N > 0"),
    (["--window-size", "-1"], "--window-size must be >= 0"),
    (["--window-size", "2", "--global-blocks", "1", "1"], "distinct block indices"),
    (["--window-size", "2", "--global-blocks", "7"], "--global-blocks takes indices 0..1"),  # the encoder has 2 blocks
])
def test_bad_window_settings_are_one_line(tmp_path, capsys, pretrained, folder, flags, message):
    assert _finetune(pretrained, folder, tmp_path / "run", "--batch-size", "4", "--max-steps", "1", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_mae_pretraining_keeps_the_position_table_and_finetuning_trains_it(tmp_path, image_dir, folder, monkeypatch,
                                                                            no_run_figures):
    """MAE pretrains with a fixed sin-cos table; its finetuning (timm's ViT) trains the loaded table, at
    layer 0's lr scale and without weight decay."""
    from helpers import pretrain

    pre = tmp_path / "mae"
    assert pretrain("--data", str(image_dir), "--out", str(pre), "--method", "mae", "--windows", "0",
                    "--max-steps", "2", "--decoder-embed-dim", "16", "--decoder-depth", "1",
                    "--decoder-num-heads", "2") == 0
    table = sincos_pos_embed_2d(32, (4, 4))[None]
    torch.testing.assert_close(safe_load(pre / "last.pt")["model"]["encoder.pos_embed"], table, rtol=0, atol=0)
    groups = []
    original = finetune_module.FinetuneTask.param_groups
    monkeypatch.setattr(finetune_module.FinetuneTask, "param_groups",
                        lambda self: groups.extend(original(self)) or groups)
    assert _finetune(pre / "last.pt", folder, tmp_path / "ft", "--batch-size", "4", "--max-steps", "1",
                     "--layer-decay", "0.5", "--warmup-epochs", "0") == 0
    tuned = safe_load(tmp_path / "ft" / "last.pt")["model"]["pos_embed"]
    assert not torch.equal(tuned, table)
    (group,) = [g for g in groups if any(p.shape == table.shape for p in g["params"])]
    assert group["weight_decay"] == 0.0 and group["lr_scale"] == 0.5 ** 3  # stem of 2 blocks + head: 4 layers
    # read at another size (export --img-size, load_model), the trained table is resampled, not replaced
    from timm.layers import resample_abs_pos_embed

    from lomar.checkpoints.formats import load_model

    wider = load_model(tmp_path / "ft" / "last.pt", img_size=64)
    torch.testing.assert_close(wider.pos_embed.detach(), resample_abs_pos_embed(tuned, [8, 8], [4, 4],
                                                                                antialias=False))
    # and so is it where --eval-only scores the classifier at another size
    built, trained_classifier = [], finetune_module._trained_classifier
    monkeypatch.setattr(finetune_module, "_trained_classifier", lambda *a: built.append(trained_classifier(*a))
                        or built[-1])
    assert main(["finetune", "--eval-only", "--pretrained", str(tmp_path / "ft"), "--data", str(folder), "--img-size",
                 "64", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "at64")]) == 0
    torch.testing.assert_close(built[0][0].pos_embed.detach(), wider.pos_embed.detach(), rtol=0, atol=0)


def test_a_finetune_saved_before_the_table_was_trained_resumes_with_it_fixed(tmp_path, image_dir, folder,
                                                                             no_run_figures):
    """A run of the previous version (no train_pos_embed setting, the table outside the optimizer) resumes."""
    from helpers import pretrain

    pre = tmp_path / "mae"
    assert pretrain("--data", str(image_dir), "--out", str(pre), "--method", "mae", "--windows", "0",
                    "--max-steps", "1", "--decoder-embed-dim", "16", "--decoder-depth", "1",
                    "--decoder-num-heads", "2") == 0
    out = tmp_path / "ft"
    assert _finetune(pre / "last.pt", folder, out, "--batch-size", "4", "--max-steps", "1", "--epochs", "2",
                     "--no-train-pos-embed") == 0
    ckpt = safe_load(out / "last.pt")
    del ckpt["settings"]["train_pos_embed"]
    torch.save(ckpt, out / "last.pt")
    assert main(["finetune", "--out", str(out), "--resume", "auto", "--max-steps", "2"]) == 0
    resumed = safe_load(out / "last.pt")
    assert resumed["step"] == 2 and resumed["settings"]["train_pos_embed"] is False
    assert torch.equal(resumed["model"]["pos_embed"], ckpt["model"]["pos_embed"])  # still fixed
    from timm.layers import resample_abs_pos_embed

    from lomar.checkpoints.formats import load_model

    wider = load_model(out / "last.pt", img_size=64)  # a fixed table at another size: resampled as a trained one
    fixed = sincos_pos_embed_2d(32, (4, 4))[None]
    assert torch.equal(ckpt["model"]["pos_embed"], fixed)
    torch.testing.assert_close(wider.pos_embed.detach(), resample_abs_pos_embed(fixed, [8, 8], [4, 4], antialias=False))


def test_an_encoder_flag_without_the_term_it_acts_on_is_noted(tmp_path, capsys, pretrained, labelled_folder):
    """--no-train-pos-embed on a LoMaR encoder (no absolute table), --no-decay-rel-pos-bias on one not BEiT's, went
    on without a word; --attention is read by its iRPE. Notes, not refusals: the run trains as without them."""
    assert _finetune(pretrained, labelled_folder, tmp_path / "run", "--batch-size", "4", "--max-steps", "1",
                     "--no-train-pos-embed", "--no-decay-rel-pos-bias", "--attention", "chunked") == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if ": note: " in line]
    assert notes == [
        "lomar finetune: note: --no-train-pos-embed is unused: it acts on an absolute position table (MAE's), and "
        "this encoder has none",
        "lomar finetune: note: --no-decay-rel-pos-bias is unused: it sets a BEiT encoder's finetuning groups, and "
        "this encoder is not BEiT's"]


def test_attention_on_an_encoder_without_a_relative_position_term_is_noted():
    from types import SimpleNamespace

    from lomar.models.vit import VisionTransformer, ViTConfig
    from lomar.train.encoder_settings import unused_encoder_flags

    mae = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, pos="abs"))
    given = SimpleNamespace(attention="dense", train_pos_embed=False, flags_given=frozenset({"attention"}))
    assert unused_encoder_flags(given, mae) == [
        "--attention dense is unused: it picks how lomar computes a relative position bias (iRPE, --rel-pos), and "
        "this encoder's attention has none"]
    # timm's BEiT has a relative position bias, its own: the note must not deny it one
    assert unused_encoder_flags(given, mae, beit=True) == [
        "--attention dense is unused: it picks how lomar computes a relative position bias (iRPE, --rel-pos), and "
        "timm's BEiT attention computes its own"]
    # the same values from a settings file, or a resumed run's own (an older detector's train_pos_embed false)
    assert unused_encoder_flags(SimpleNamespace(attention="dense", train_pos_embed=False), mae) == []
