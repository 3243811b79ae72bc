"""One checkpoint-reading path: format detection, the reader registry, export validation, atomic writes."""

import json
import os
import pickle
import re
import stat

import pytest
import torch

from helpers import dead_pid
from lomar import LoMaR, VisionTransformer, ViTConfig, export_encoder
from lomar.checkpoints import formats
from lomar.checkpoints import reader as reader_registry
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.export import create_encoder, expected_shapes, read_export
from lomar.checkpoints.io import atomic_save, atomic_write_text, safe_load
from lomar.checkpoints.keys import lomar_to_original
from lomar.cli.app import main
from lomar.errors import UsageError


class Custom:
    """A class a weights-only load refuses."""


VIT = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same tiny LoMaR as each format lomar reads."""
    root = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    model = LoMaR(VIT, window_size=3, num_windows=2)
    atomic_save(pretrain_checkpoint(model), root / "pretrain.pt")
    atomic_save({"model": lomar_to_original(model.state_dict())}, root / "original.pth")
    classifier = VisionTransformer(VIT, num_classes=3)
    atomic_save(pretrain_checkpoint(classifier), root / "classifier.pt")
    export_encoder(model.encoder, root / "export")
    return model, root


@pytest.mark.parametrize("name, fmt, kind", [
    ("pretrain.pt", "lomar-pretrain", LoMaR),
    ("original.pth", "original-lomar", LoMaR),
    ("classifier.pt", "lomar-vit", VisionTransformer),
    ("export", "export", VisionTransformer),
])
def test_each_format_is_detected_once_and_read(sources, name, fmt, kind):
    model, root = sources
    reader, src = formats.read(root / name)
    assert src.format == fmt == reader.name
    assert isinstance(formats.load_model(root / name), kind)
    weights = formats.encoder_weights(root / name)
    if fmt != "lomar-vit":  # the classifier is another network
        for key, value in model.encoder.state_dict().items():
            if key != "pos_embed":
                assert torch.equal(weights.state[key], value), key


def test_lomar_window_override_does_not_window_the_encoder(sources):
    """``--window-size`` is LoMaR's K; the encoder of an original LoMaR still attends globally."""
    _, root = sources
    model = formats.load_model(root / "original.pth", window_size=2)
    assert model.window_size == 2 and model.encoder.config.window_size == 0


def test_a_new_reader_slots_in_with_one_registration(tmp_path, monkeypatch):
    """How BEiT's original checkpoint is added: one Reader, registered before the LoMaR fallback."""
    class Fake(formats.Reader):
        name = "original-fake"

        def detect(self, data, state):
            return "lm_head.weight" in state

        def model(self, src, overrides):
            return "fake model"

    monkeypatch.setattr(reader_registry, "_READERS", list(reader_registry._READERS))
    formats.register(Fake(), 60)
    state = {"lm_head.weight": torch.zeros(2, 2), "patch_embed.proj.weight": torch.zeros(4, 3, 2, 2)}
    atomic_save({"model": state}, tmp_path / "beit.pth")
    assert formats.load_model(tmp_path / "beit.pth") == "fake model"


def test_a_spec_claiming_huge_widths_is_refused_before_the_model_is_built(sources, tmp_path, monkeypatch):
    """A checkpoint of tiny tensors whose model spec asks for a 200-billion-parameter LoMaR."""
    from lomar.models import vit

    model, _ = sources
    checkpoint = pretrain_checkpoint(model)
    checkpoint["model_spec"]["config"].update(embed_dim=16384, depth=64, num_heads=16)
    atomic_save(checkpoint, tmp_path / "bomb.pt")
    built = []
    monkeypatch.setattr(vit.VisionTransformer, "__init__", lambda self, *a, _real=vit.VisionTransformer.__init__,
                        **k: built.append(str(torch.get_default_device())) or _real(self, *a, **k))
    with pytest.raises(ValueError, match=r"weights do not fit its model spec .*missing \['encoder.blocks.10"):
        formats.load_model(tmp_path / "bomb.pt")
    assert built == ["meta"]


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
    """--window-size, --windows and --decoder-num-heads set a LoMaR / MAE pretraining model: `lomar export
    classifier.pt --windows 9` wrote the classifier as if the flag were not given, and an original checkpoint took
    another method's (an MAE decoder's heads for a LoMaR) so. Each is now named in one line, in the command's words; a
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


def test_unknown_format_is_named(tmp_path):
    atomic_save({"model": {"foo.weight": torch.zeros(1)}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"x.pt is in no format lomar reads \(keys: foo.weight"):
        formats.read(tmp_path / "x.pt")


def test_text_file_and_unsafe_pickle_messages(tmp_path):
    for text in ("hello", "garbage" * 100, '{"model": "json"}'):  # torch's refusals of these differ
        (tmp_path / "afile.txt").write_text(text)
        with pytest.raises(ValueError, match="afile.txt: it is a text file, expected a PyTorch checkpoint"):
            safe_load(tmp_path / "afile.txt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"model": 1}, protocol=4))
    with pytest.raises(ValueError, match="plain.pkl: it is a Python pickle, not a checkpoint written by torch.save"):
        safe_load(tmp_path / "plain.pkl")

    torch.save({"model": {}, "thing": Custom()}, tmp_path / "custom.pt")
    with pytest.raises(ValueError) as info:
        safe_load(tmp_path / "custom.pt")
    message = str(info.value)
    assert "\x1b" not in message and "\n" not in message and "weights-only" in message


@pytest.mark.parametrize("config", [
    VIT, ViTConfig(img_size=(32, 48), patch_size=16, embed_dim=24, depth=1, num_heads=3, mlp_ratio=2.5, pos="abs"),
    ViTConfig(img_size=16, patch_size=8, embed_dim=8, depth=3, num_heads=1, pos="none"),
])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_expected_shapes_match_the_real_model(config, num_classes):
    real = {k: tuple(v.shape) for k, v in VisionTransformer(config, num_classes=num_classes).state_dict().items()}
    assert expected_shapes(config, num_classes) == real


def _export(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "exp"
    export_encoder(VisionTransformer(VIT), out)
    return out


def _edit(folder, **changes):
    data = json.loads((folder / "config.json").read_text())
    data.update(changes)
    (folder / "config.json").write_text(json.dumps(data))


# Crafted export folders: each must be refused in one line before any model is built.
BAD_EXPORTS = [
    ("huge depth", lambda d: _edit(d, depth=1_000_000), "depth must be an int in [1, 64]"),
    ("string width", lambda d: _edit(d, embed_dim="32"), "embed_dim must be an int"),
    ("bool heads", lambda d: _edit(d, num_heads=True), "num_heads must be an int"),
    ("width over heads", lambda d: _edit(d, num_heads=3), "not divisible by num_heads 3"),
    ("huge width", lambda d: _edit(d, embed_dim=100_000), "embed_dim must be an int in [1, 8192]"),
    ("odd image size", lambda d: _edit(d, img_size=30), "not a multiple of patch_size"),
    ("zero patch", lambda d: _edit(d, patch_size=0), "patch_size must be an int"),
    ("bad pos", lambda d: _edit(d, pos="learned"), "pos must be"),
    ("nan mlp", lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace(
        '"mlp_ratio": 4.0', '"mlp_ratio": NaN')), "mlp_ratio must be a number"),
    ("weights outside", lambda d: _edit(d, weights="../x.safetensors"), "weights must be a file name"),
    ("not json", lambda d: (d / "config.json").write_text("{oops"), "is not valid JSON"),
    ("json list", lambda d: (d / "config.json").write_text("[1]"), "expected an object"),
    ("not safetensors", lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "is not a safetensors file"),
    ("pickle weights", lambda d: torch.save({"a": torch.zeros(1)}, d / "model.safetensors"), "not a safetensors"),
    ("wrong depth", lambda d: _edit(d, depth=3), "does not match"),
    ("negative window", lambda d: _edit(d, window_size=-1), "window_size must be an int in [0, 8192]"),
    ("huge window", lambda d: _edit(d, window_size=10**9), "window_size must be an int in [0, 8192]"),
    ("string window", lambda d: _edit(d, window_size="14"), "window_size must be an int"),
    ("global block past depth", lambda d: _edit(d, window_size=2, global_blocks=[2]),
     "global_blocks must be a list of distinct block indices in [0, 1]"),
    ("repeated global block", lambda d: _edit(d, window_size=2, global_blocks=[1, 1]), "global_blocks must be"),
    ("float global block", lambda d: _edit(d, window_size=2, global_blocks=[1.0]), "global_blocks must be"),
    ("global blocks text", lambda d: _edit(d, window_size=2, global_blocks="1"), "global_blocks must be"),
    ("bad attention", lambda d: _edit(d, attention="fast"), "attention must be one of auto, dense"),
    ("missing weights", lambda d: (d / "model.safetensors").unlink(), "not found"),
]


@pytest.mark.parametrize("name, corrupt, words", BAD_EXPORTS, ids=[b[0] for b in BAD_EXPORTS])
def test_bad_export_folders_are_refused_before_building(tmp_path, name, corrupt, words, monkeypatch, capsys):
    folder = _export(tmp_path)
    corrupt(folder)
    built = []
    monkeypatch.setattr(VisionTransformer, "__init__", lambda *a, **k: built.append(1) or 1 / 0)
    with pytest.raises(UsageError, match=re.escape(words)):
        create_encoder(folder)
    assert not built
    monkeypatch.undo()
    assert main(["export", str(folder), "--to", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_read_export_accepts_a_new_head(tmp_path):
    folder = _export(tmp_path)
    found = read_export(folder, num_classes=4)
    assert (found.num_classes, found.global_pool, found.new_head) == (4, "avg", True)
    assert create_encoder(folder, num_classes=4).head.out_features == 4


def test_export_files_are_0644_and_an_unrelated_config_is_kept(tmp_path):
    folder = _export(tmp_path)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o644
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"name": "my project"}')
    with pytest.raises(UsageError, match="is not a lomar export; pass --overwrite"):
        export_encoder(VisionTransformer(VIT), other)
    assert main(["export", str(folder), "--to", str(other)]) == 2
    assert json.loads((other / "config.json").read_text()) == {"name": "my project"}
    assert not (other / "model.safetensors").exists()
    export_encoder(VisionTransformer(VIT), folder)  # our own export: replaced without asking
    export_encoder(VisionTransformer(VIT), other, overwrite=True)
    assert "architecture" in json.loads((other / "config.json").read_text())


def test_atomic_write_leaves_no_temporary_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_heads_no_shape_tells_are_asked_for_with_the_command_that_takes_them():
    from helpers import reference_dir

    mae = reference_dir() / "mae_64" / "mae_checkpoint.pth"  # 48 wide, 2 deep: no standard size
    with pytest.raises(ValueError, match=r"pass num_heads=\.\.\. to load_original, or convert it first: lomar "
                                         r"load-original CKPT --num-heads N --to FILE"):
        formats.encoder_weights(mae)
    assert formats.encoder_weights(mae, num_heads=4).config.num_heads == 4


def test_an_exports_weights_file_is_read_with_what_its_folder_says(sources, tmp_path):
    """Passed alone, an export's safetensors file is read with its folder's config.json, not as a bare state dict:
    an RPE encoder exported at 32 px comes back at 32 px (no table tells the size), and a BEiT export's weights are
    known as BEiT's."""
    from lomar.checkpoints.export_beit import export_beit_encoder
    from lomar.models.beit import BEiT, BEiTConfig

    _, root = sources
    reader, src = formats.read(root / "export" / "model.safetensors")
    assert src.path == root / "export" and reader.encoder(src, {}).config.img_size == 32
    copy = tmp_path / "copy.safetensors"  # a file its folder's config.json does not name is read on its own
    copy.write_bytes((root / "export" / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text((root / "export" / "config.json").read_text())
    assert formats.read(copy)[1].path == copy
    beit = tmp_path / "beit"
    export_beit_encoder(BEiT(BEiTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                        vocab_size=16)), beit)
    assert formats.holds_beit(beit / "encoder.safetensors")


def test_a_run_folder_without_an_export_names_the_checkpoints_it_keeps(tmp_path, capsys):
    """`lomar export FINETUNE_RUN` names the run's checkpoints as the files to pass, not only 'a folder without
    config.json'."""
    run = tmp_path / "ft"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")
    (run / "best.pt").write_bytes(b"")
    assert main(["export", str(run), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"pass its checkpoint, {run / 'best.pt'} or {run / 'last.pt'}") and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="a checkpoint file or a folder written by `lomar export`"):
        formats.read(tmp_path)  # no checkpoint kept either


def test_a_folder_whose_export_was_killed_midway_names_its_set_aside_files(tmp_path, capsys):
    """A kill between write_export's renames leaves the old pair at .NAME.old-TAG and no config.json: the reader names
    those files and how to get the export back, not only 'a folder without config.json', which reads as a lost
    export."""
    from lomar.checkpoints.export_leftovers import writer_tag

    run, host = tmp_path / "run", writer_tag().split("-")[0]
    tag = f"{host}-{dead_pid()}-0123456789abcdef"
    export_encoder(VisionTransformer(VIT), run, weights_name="encoder.safetensors")
    atomic_save({}, run / "last.pt")
    for name in ("config.json", "encoder.safetensors"):
        os.replace(run / name, run / f".{name}.old-{tag}")
    assert main(["export", str(run), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and (
        f"{run} is a folder without config.json; an export into it was interrupted: its previous files are "
        f".config.json.old-{tag}, .encoder.safetensors.old-{tag} (export again, or rename them back to config.json, "
        f"encoder.safetensors); pass its checkpoint, {run / 'last.pt'}") in err
    live = f"{host}-{os.getppid()}-0123456789abcdef"
    for name in ("config.json", "encoder.safetensors"):
        os.replace(run / f".{name}.old-{tag}", run / f".{name}.old-{live}")  # a live export's: mid-swap
    with pytest.raises(ValueError, match=r"without config.json; pass its checkpoint"):
        formats.read(run)


def test_a_finetune_run_folder_is_not_said_to_be_unfinished(tmp_path):
    """load_pretrained_encoder (knn, linprobe, finetune, ...) reads a run folder without an export through its
    last.pt; only a pretraining run ends with an export, so only its folder without one is a stopped run."""
    from lomar.checkpoints.kinds import FINETUNE_FORMAT, PRETRAIN_FORMAT
    from lomar.eval.features import load_pretrained_encoder

    config = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    classifier = VisionTransformer(config, num_classes=3)
    atomic_save({"model": classifier.state_dict(), "config": config.to_dict(), "format": FINETUNE_FORMAT,
                 "step": 7}, tmp_path / "ft" / "last.pt")
    summary = load_pretrained_encoder(tmp_path / "ft").load_report.summary()
    assert summary.endswith("; saved at step 7") and "not finished" not in summary
    atomic_save({**pretrain_checkpoint(LoMaR(config, window_size=2, num_windows=1)), "format": PRETRAIN_FORMAT,
                 "step": 5}, tmp_path / "pre" / "last.pt")
    stopped = load_pretrained_encoder(tmp_path / "pre").load_report.summary()
    assert "holds no export, so its run has not finished" in stopped


def test_a_finished_pretrain_run_folder_is_named_as_one_not_as_an_export(sources, tmp_path):
    """--pretrained RUN (a finished pretraining's folder) printed 'loaded 10 tensors from exported folder RUN'."""
    from lomar.checkpoints.file_names import RUN_ENCODER
    from lomar.eval.features import load_pretrained_encoder

    model, root = sources
    run = tmp_path / "run"
    export_encoder(model.encoder, run, weights_name=RUN_ENCODER, metadata={"method": "lomar", "step": 4})
    (run / "config.yaml").write_text("method: lomar\n")  # the run's settings, beside its end's export
    summary = load_pretrained_encoder(run).load_report.summary()
    assert summary.startswith(f"loaded {len(model.encoder.state_dict())} tensors from pretrain run folder (lomar) "
                              f"{run}; ")
    assert load_pretrained_encoder(root / "export").load_report.summary().startswith(
        f"loaded {len(model.encoder.state_dict())} tensors from exported folder {root / 'export'}; ")


def test_a_finished_beit_pretrain_run_folder_is_named_as_one_not_as_an_export(tmp_path):
    from lomar.checkpoints.export_beit import export_beit_encoder
    from lomar.eval.features import load_pretrained_encoder
    from lomar.models.beit import BEiT, BEiTConfig

    beit = BEiT(BEiTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, vocab_size=16))
    for folder, weights in (("run", "encoder.safetensors"), ("export", "model.safetensors")):
        export_beit_encoder(beit, tmp_path / folder, weights_name=weights, metadata={"step": 4})
    (tmp_path / "run" / "config.yaml").write_text("method: beit\n")
    for folder, source in (("run", "pretrain run folder (beit)"), ("export", "exported folder (beit)")):
        assert f" tensors from {source} {tmp_path / folder}; " in load_pretrained_encoder(
            tmp_path / folder).load_report.summary()
