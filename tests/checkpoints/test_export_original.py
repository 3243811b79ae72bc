"""Exports and conversions of an original (CC-BY-NC code's) checkpoint: `lomar export` and load-original agree, and
a window, block count, head count or image size that does not fit is named by its parameter or flag."""

from dataclasses import replace

import pytest
import torch
from export_models import TINY, _perturb

from helpers import reference_dir
from lomar import LoMaR, create_encoder, load_original, model_config
from lomar.checkpoints.formats import load_model
from lomar.checkpoints.keys import lomar_to_original
from lomar.cli.app import main

timm = pytest.importorskip("timm")
import lomar.integrations.timm  # noqa: E402,F401  (registers lomar_vit_* in timm)


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
