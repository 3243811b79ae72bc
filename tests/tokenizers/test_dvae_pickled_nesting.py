"""A pickled dVAE's modules are walked for their parameters: a crafted encoder.pkl whose modules nest in a loop or
deeper than DALL-E's encoder, or whose parameter is no tensor, is refused with one line naming where."""

import sys
import types

import pytest
import torch

from lomar.tokenizers import DVAEConfig, DVAEEncoder, load_tokenizer


def _pickled_classes(monkeypatch) -> tuple[type, type]:
    """Importable stand-ins for ``dall_e.encoder.Encoder`` / ``EncoderBlock`` (the names the loader reads), so that
    torch.save writes the official pickle's globals; their instances pickle their ``__dict__`` as a module does."""
    module = types.ModuleType("dall_e.encoder")
    classes = []
    for name in ("Encoder", "EncoderBlock"):
        cls = type(name, (), {})
        cls.__module__, cls.__qualname__ = "dall_e.encoder", name
        setattr(module, name, cls)
        classes.append(cls)
    monkeypatch.setitem(sys.modules, "dall_e", types.ModuleType("dall_e"))
    monkeypatch.setitem(sys.modules, "dall_e.encoder", module)
    return classes[0], classes[1]


def _node(cls: type, **children) -> object:
    node = cls()
    node.__dict__.update(_parameters={"w": torch.zeros(1)}, _modules=dict(children))
    return node


def _too_deep(at: str) -> str:
    """The whole refusal of a dVAE whose modules nest in a loop or too deep, as a pattern; ``at``: a pattern of the
    module path where the walk stopped."""
    return rf"^the pickled dVAE nests its modules in a loop or too deep \(at '{at}'\); the file is damaged or crafted$"


def test_a_chain_of_modules_deeper_than_the_official_encoders_is_refused(tmp_path, monkeypatch):
    """DALL-E's encoder nests 4 deep (blocks.group_1.block_1.res_path.conv_1); 12 levels is a crafted file."""
    encoder_cls, block_cls = _pickled_classes(monkeypatch)
    node = _node(block_cls)
    for _ in range(11):
        node = _node(block_cls, inner=node)
    torch.save(_node(encoder_cls, blocks=node), tmp_path / "deep.pkl")
    with pytest.raises(ValueError, match=_too_deep(r"blocks\.(inner\.){8}")):
        load_tokenizer(tmp_path / "deep.pkl")


def test_a_module_that_is_its_own_child_is_refused(tmp_path, monkeypatch):
    encoder_cls, block_cls = _pickled_classes(monkeypatch)
    block = _node(block_cls)
    block._modules["again"] = block
    torch.save(_node(encoder_cls, blocks=block), tmp_path / "loop.pkl")
    with pytest.raises(ValueError, match=_too_deep(r"blocks\.again\.")):
        load_tokenizer(tmp_path / "loop.pkl")


def test_an_encoder_that_contains_itself_is_refused_without_importing_dall_e(tmp_path, monkeypatch):
    """The stand-ins only write the pickle: loading it never imports them."""
    encoder_cls, _ = _pickled_classes(monkeypatch)
    encoder = encoder_cls()
    encoder.__dict__.update(_parameters={}, _modules={"blocks": encoder}, n_hid=256)
    torch.save(encoder, tmp_path / "encoder.pkl")
    monkeypatch.delitem(sys.modules, "dall_e.encoder")
    with pytest.raises(ValueError, match=_too_deep(r"blocks\.")):
        load_tokenizer(tmp_path / "encoder.pkl")


def test_a_pickled_parameter_that_is_no_tensor_is_named(tmp_path, monkeypatch):
    encoder_cls, block_cls = _pickled_classes(monkeypatch)
    block = _node(block_cls)
    block._parameters["b"] = "0.5"
    torch.save(_node(encoder_cls, blocks=block), tmp_path / "text.pkl")
    with pytest.raises(ValueError, match=r"^the pickled dVAE parameter blocks\.b is a str, not a tensor$"):
        load_tokenizer(tmp_path / "text.pkl")


def test_the_shapes_decide_where_a_pickled_setting_is_no_whole_number(tmp_path, monkeypatch):
    """DALL-E's Encoder pickles its attrs fields beside its modules: only whole numbers among them are settings to
    check against the shapes; anything else there is not read."""
    encoder_cls, _ = _pickled_classes(monkeypatch)
    encoder = DVAEEncoder(DVAEConfig(n_hid=4, n_blk_per_group=1, vocab_size=8))
    pickled = encoder_cls()
    pickled.__dict__.update(_parameters=dict(encoder.state_dict()), _modules={}, n_hid="four", vocab_size=8)
    torch.save(pickled, tmp_path / "encoder.pkl")
    loaded = load_tokenizer(tmp_path / "encoder.pkl")
    assert (loaded.config.n_hid, loaded.config.vocab_size) == (4, 8)
