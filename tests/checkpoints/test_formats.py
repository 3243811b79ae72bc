"""One checkpoint-reading path: each format detected once and read, the reader registry a new format slots into,
and the one-line refusals of an unknown format, a text file, an unsafe pickle and a spec of huge widths."""

import pickle

import pytest
import torch
from format_models import VIT

from lomar import LoMaR, VisionTransformer
from lomar.checkpoints import formats
from lomar.checkpoints import reader as reader_registry
from lomar.checkpoints.convert import pretrain_checkpoint
from lomar.checkpoints.io import atomic_save, safe_load


class Custom:
    """A class a weights-only load refuses."""


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


@pytest.mark.parametrize("num_classes, source", [(3, "classifier checkpoint"), (0, "ViT encoder checkpoint")])
def test_a_bare_vit_state_dict_is_named_by_whether_it_holds_a_head(tmp_path, num_classes, source):
    """A ViT's state_dict alone (timm's keys, as torch.save wrote it): a classifier where it has a head."""
    torch.save(VisionTransformer(VIT, num_classes=num_classes).state_dict(), tmp_path / "vit.pth")
    assert formats.encoder_weights(tmp_path / "vit.pth").source == source


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
