"""What a checkpoint's saved settings rebuild (a classifier's pooling, size and ViTConfig; a pretraining run's
windows) and how a reader treats settings given beside them: taken where they fill a gap, refused in one line naming
the saved value where they contradict it."""

import re

import pytest
import torch
from format_models import VIT

from lomar import VisionTransformer, ViTConfig, export_encoder
from lomar.checkpoints import formats
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.io import atomic_save, safe_load
from lomar.cli.app import main


@pytest.mark.parametrize("saved_pool", [True, False])
def test_a_cls_pooled_classifier_loads_as_it_was_trained(tmp_path, saved_pool):
    """`lomar finetune --global-pool cls` keeps the final norm and no fc_norm; an original MAE cls classifier
    has the same keys but no saved pooling."""
    torch.manual_seed(0)
    classifier = VisionTransformer(VIT, num_classes=3, global_pool="cls")
    atomic_save({"model": classifier.state_dict(), **({"global_pool": "cls"} if saved_pool else {})},
                tmp_path / "cls.pt")
    loaded = formats.load_model(tmp_path / "cls.pt")
    x = torch.randn(2, 3, 32, 32)
    assert loaded.global_pool == "cls"
    torch.testing.assert_close(loaded.eval()(x), classifier.eval()(x))


def test_a_non_square_classifier_loads_at_its_saved_size_and_a_bare_one_asks_for_it(tmp_path):
    """A (height, width) size saved in the checkpoint's config rebuilds that grid; without it no shape tells a
    4 x 6 grid from a 6 x 4 one, so the reader asks rather than guessing a square."""
    torch.manual_seed(0)
    config = ViTConfig(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, pos="abs")
    classifier = VisionTransformer(config, num_classes=3)
    atomic_save({"model": classifier.state_dict(), "config": config.to_dict()}, tmp_path / "saved.pt")
    loaded = formats.load_model(tmp_path / "saved.pt")
    x = torch.randn(2, 3, 32, 48)
    assert loaded.config.img_size == (32, 48)
    torch.testing.assert_close(loaded.eval()(x), classifier.eval()(x))
    atomic_save({"model": classifier.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match=r"holds 24 patches, not a square grid.*pass img_size=\(height, width\)"):
        formats.load_model(tmp_path / "bare.pt", num_heads=2)
    assert formats.load_model(tmp_path / "bare.pt", num_heads=2, img_size=(32, 48)).config.img_size == (32, 48)


def test_a_classifier_is_rebuilt_from_the_vit_config_it_saved_and_a_held_checkpoint_is_not_read_again(
        tmp_path, monkeypatch):
    """A `lomar finetune` checkpoint's saved ViTConfig rebuilds it as trained, the layout no shape tells too (its
    ViTDet windows), but for its machine's attention and its training's drop path, which the reader's caller picks;
    a caller that holds the checkpoint (finetune --eval-only) identifies it without a read."""
    from dataclasses import replace

    from lomar.checkpoints.kinds import FINETUNE_FORMAT

    torch.manual_seed(0)
    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, pos="abs", attention="chunked",
                       drop_path=0.1, window_size=2, global_blocks=(1,))
    classifier = VisionTransformer(config, num_classes=3)
    atomic_save({"model": classifier.state_dict(), "config": config.to_dict(), "global_pool": "avg",
                 "format": FINETUNE_FORMAT}, tmp_path / "best.pt")
    held = safe_load(tmp_path / "best.pt")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("read again"))
    reader, src = formats.identify(tmp_path / "best.pt", held)
    loaded = reader.model(src, {})
    monkeypatch.undo()
    assert (src.format, loaded.config) == ("lomar-vit", replace(config, attention="auto", drop_path=0.0))
    assert formats.encoder_weights(tmp_path / "best.pt").config == loaded.config
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), classifier.eval()(x))
    wider = formats.load_model(tmp_path / "best.pt", img_size=48, attention="dense")
    assert wider.config == replace(config, img_size=48, attention="dense", drop_path=0.0)


def test_a_saved_config_that_does_not_describe_its_weights_is_refused_before_a_model_is_built(tmp_path, monkeypatch):
    """A checkpoint of tiny tensors whose saved ViTConfig claims a 200-billion-parameter encoder: every reader of
    it refuses it in one line, naming what differs, and builds nothing."""
    from lomar.eval.features import load_pretrained_encoder
    from lomar.models import vit

    claims = {**VIT.to_dict(), "embed_dim": 16384, "depth": 64, "num_heads": 16}
    atomic_save({"model": VisionTransformer(VIT, num_classes=3).state_dict(), "config": claims}, tmp_path / "big.pt")
    monkeypatch.setattr(vit.VisionTransformer, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    for read in (formats.load_model, formats.encoder_weights, load_pretrained_encoder):  # load_model's read first
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'big.pt'}: its saved config does not describe its "
                                                       f"weights: embed_dim 16384 (its weights: 32), depth 64 (its "
                                                       f"weights: 2), num_heads 16 (its weights: 2)")):
            read(tmp_path / "big.pt")


@pytest.mark.parametrize("key", ["model_spec", "vit_config"])  # vit_config alone: a classifier saved before specs
def test_a_classifier_that_saved_its_config_refuses_another_num_heads_and_a_size_its_table_is_not_of(tmp_path, key):
    """num_heads fills in what a checkpoint without a saved ViTConfig cannot tell: one that saved its config refuses
    another in one line (not built as another model of the same weights, nor dropped without a word); a saved
    img_size that its absolute position table is not of is named with the other differences, before any build."""
    from dataclasses import replace

    from lomar.eval.features import load_pretrained_encoder

    config = replace(VIT, pos="abs")
    classifier = pretrain_checkpoint(VisionTransformer(config, num_classes=3))
    if key == "vit_config":
        del classifier["model_spec"]
    atomic_save(classifier, tmp_path / "classifier.pt")
    assert formats.load_model(tmp_path / "classifier.pt", num_heads=2).config == config  # its own: taken
    for read in (formats.load_model, formats.encoder_weights, load_pretrained_encoder):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'classifier.pt'}: its saved {key} gives "
                                                       f"num_heads 2; drop num_heads=4 (a setting for checkpoints "
                                                       f"that save no ViTConfig)")):
            read(tmp_path / "classifier.pt", num_heads=4)
    larger = {**config.to_dict(), "img_size": 48}
    saved = {"model_spec": {**classifier["model_spec"], "config": larger}} if key == "model_spec" else {key: larger}
    atomic_save({**classifier, **saved}, tmp_path / "larger.pt")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'larger.pt'}: its saved {key} does not describe "
                                                   f"its weights: img_size 48 (its weights: a position table of 16 "
                                                   f"patches)")):
        formats.load_model(tmp_path / "larger.pt")
    export_encoder(VisionTransformer(config), tmp_path / "export")  # its config.json gives its heads too
    assert formats.load_model(tmp_path / "export", num_heads=2).config.num_heads == 2
    for read in (formats.load_model, formats.encoder_weights, load_pretrained_encoder):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'export'}: its config.json gives num_heads 2; "
                                                       f"drop num_heads=4")):
            read(tmp_path / "export", num_heads=4)
    rpe = VisionTransformer(VIT, num_classes=3).state_dict()  # saves no config: its RPE tables tell its 2 heads
    atomic_save({"model": rpe}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bare.pt'}: its weights do not fit the 32-wide, "
                                                   f"2-deep, 4-head encoder: ")) as refused:
        formats.load_model(tmp_path / "bare.pt", num_heads=4)
    assert str(refused.value).endswith("; drop num_heads=... (its RPE tables tell its heads)")


def test_a_pretraining_setting_given_for_a_classifier_or_an_export_is_refused_not_dropped(sources, tmp_path, capsys):
    """--window-size, --windows and --decoder-num-heads set a LoMaR / MAE pretraining model: given for a classifier
    or an export (`lomar export classifier.pt --windows 9`), or another method's for an original checkpoint (an MAE
    decoder's heads for a LoMaR), each is named in one line, in the command's words, not dropped as if not given; a
    pretraining checkpoint's encoder refuses heads its saved model contradicts, takes its own."""
    _, root = sources
    for name, what in (("classifier.pt", "a ViT classifier or encoder"), ("export", "an exported encoder")):
        with pytest.raises(ValueError, match=re.escape(f"{root / name} is {what}, no pretraining model; drop "
                                                       f"decoder_num_heads=4 (an MAE decoder's heads), window_size=5 "
                                                       f"(LoMaR's window size)")):
            formats.load_model(root / name, window_size=5, decoder_num_heads=4)
        assert main(["export", str(root / name), "--windows", "9", "--to", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err.endswith(f"{what}, no pretraining model; drop --windows 9 (LoMaR's window "
                                                f"count)\n")
        assert not (tmp_path / name).exists()
    assert formats.load_model(root / "export", img_size=48).config.img_size == 48  # what an encoder takes: taken
    with pytest.raises(ValueError, match=re.escape(f"{root / 'original.pth'} is an original LoMaR pretraining "
                                                   f"checkpoint; drop decoder_num_heads=4 (an MAE decoder's heads)")):
        formats.load_model(root / "original.pth", decoder_num_heads=4)  # another method's setting, as an MAE's K
    assert main(["load-original", str(root / "original.pth"), "--decoder-num-heads", "4", "--to",
                 str(tmp_path / "lomar.pt")]) == 2
    assert capsys.readouterr().err.endswith("drop --decoder-num-heads 4 (an MAE decoder's heads)\n")
    with pytest.raises(ValueError, match=re.escape(f"{root / 'pretrain.pt'}: its saved model gives num_heads 2; "
                                                   f"drop num_heads=4")):
        formats.encoder_weights(root / "pretrain.pt", num_heads=4)
    assert formats.encoder_weights(root / "pretrain.pt", num_heads=2).config.num_heads == 2


def test_a_pretraining_checkpoint_takes_the_settings_it_saved_and_names_them_for_another(sources, tmp_path):
    """Its reader refused every override, even the window size it saved ('drop window_size=...'), where a BEiT's
    took its own: one rule for both, another value named with the one it saved."""
    _, root = sources
    model = formats.load_model(root / "pretrain.pt", window_size=3, num_windows=2, num_heads=2, img_size=(32, 32))
    assert (model.window_size, model.num_windows) == (3, 2)
    with pytest.raises(ValueError, match=re.escape(f"{root / 'pretrain.pt'} is a lomar pretraining checkpoint, which "
                                                   f"carries its own settings; drop decoder_num_heads=4 (an MAE "
                                                   f"decoder's heads), window_size=5 (it saved 3)")):
        formats.load_model(root / "pretrain.pt", window_size=5, num_windows=2, decoder_num_heads=4)
    checkpoint = safe_load(root / "pretrain.pt")
    del checkpoint["model_spec"]["config"]  # a spec without its config is named, not a KeyError
    atomic_save(checkpoint, tmp_path / "no_config.pt")
    with pytest.raises(ValueError, match="needs 'config' and 'args' mappings"):
        formats.load_model(tmp_path / "no_config.pt")


def test_a_beit_pretraining_checkpoint_takes_the_windows_its_run_saved_and_names_them(tmp_path):
    """A BEiT run masks in LoMaR's windows and saves them (visualize draws them): its own --windows is taken, and
    another is refused naming what the run saved, not as 'LoMaR's window count'."""
    from lomar.models.beit import BEiT, BEiTConfig

    config = BEiTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, vocab_size=16)
    spec = {"arch": "lomar.models.beit:BEiT", "config": config.to_dict(), "args": {}, "prefix": "beit."}
    state = {f"beit.{k}": v for k, v in BEiT(config).state_dict().items()}
    run = {"method": "beit", "img_size": 32, "window_size": 3, "windows": 2}
    atomic_save({"model": state, "model_spec": spec, "config": run}, tmp_path / "beit.pt")
    assert isinstance(formats.load_model(tmp_path / "beit.pt", window_size=3, num_windows=2, img_size=32), BEiT)
    with pytest.raises(ValueError, match=re.escape("which carries its own settings; drop num_windows=4 (it saved 2)")):
        formats.load_model(tmp_path / "beit.pt", num_windows=4)
    del spec["config"]  # a spec without its config is named, not a KeyError
    atomic_save({"model": state, "model_spec": spec, "config": run}, tmp_path / "no_config.pt")
    with pytest.raises(ValueError, match="needs 'config' and 'args' mappings"):
        formats.load_model(tmp_path / "no_config.pt")


def test_a_command_takes_a_non_square_size_for_a_bare_checkpoint(tmp_path, capsys):
    """--img-size takes HEIGHT WIDTH, which the library's 'pass img_size=(height, width)' is reworded into."""
    from lomar.cli.app import main
    from lomar.eval.features import load_pretrained_encoder

    config = ViTConfig(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, pos="abs")
    atomic_save({"model": VisionTransformer(config, num_classes=3).state_dict()}, tmp_path / "bare.pt")
    export = ["export", str(tmp_path / "bare.pt"), "--num-heads", "2", "--to", str(tmp_path / "out")]
    assert main(export) == 2
    assert "saves no image size; pass --img-size HEIGHT WIDTH for the size" in capsys.readouterr().err
    assert main([*export, "--img-size", "32", "48", "1"]) == 2
    assert "--img-size takes SIZE or HEIGHT WIDTH, got 32 48 1" in capsys.readouterr().err
    # read to be resampled (finetune's, knn's --img-size is the crop's): the export above is the way, named
    bare = tmp_path / "bare.pt"
    for read in (lambda: formats.encoder_weights(bare, num_heads=2),  # load_pretrained_encoder's
                 lambda: formats.load_model(bare, num_heads=2, img_size=32)):
        with pytest.raises(ValueError, match=f"saves no image size to resample it from; record the size it was "
                                             f"trained at first: lomar export {bare} --img-size HEIGHT WIDTH --to DIR"):
            read()
    assert main([*export, "--img-size", "32", "48"]) == 0
    assert formats.load_model(tmp_path / "out").config.img_size == (32, 48)
    assert load_pretrained_encoder(tmp_path / "out", img_size=32).config.img_size == 32


def test_heads_no_shape_tells_are_asked_for_with_the_command_that_takes_them():
    from helpers import reference_dir

    mae = reference_dir() / "mae_64" / "mae_checkpoint.pth"  # 48 wide, 2 deep: no standard size
    with pytest.raises(ValueError) as refused:
        formats.encoder_weights(mae)
    assert str(refused.value).endswith(f"pass num_heads=... to load_original, or convert it first: lomar load-original "
                                       f"{mae} --num-heads N --to FILE")  # the file itself, to paste
    assert formats.encoder_weights(mae, num_heads=4).config.num_heads == 4
