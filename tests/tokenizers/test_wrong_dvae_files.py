"""The files a user downloads beside DALL-E's encoder, or has at hand, given as the dVAE: one line naming the
file and what to pass instead (DALL-E's decoder.pkl was only 'a class that could run code')."""

import sys
import types

import pytest
import torch

from lomar.tokenizers import load_tokenizer


def test_dalle_decoder_pkl_is_named_as_the_decoder_and_nothing_of_it_runs(tmp_path, monkeypatch):
    module = types.ModuleType("dall_e.decoder")

    class Decoder(torch.nn.Module):
        def __setstate__(self, state):
            pytest.fail("the pickle's class ran")

    Decoder.__module__, Decoder.__qualname__ = "dall_e.decoder", "Decoder"
    module.Decoder = Decoder
    monkeypatch.setitem(sys.modules, "dall_e", types.ModuleType("dall_e"))
    monkeypatch.setitem(sys.modules, "dall_e.decoder", module)
    torch.save(Decoder(), tmp_path / "decoder.pkl")
    with pytest.raises(ValueError) as info:
        load_tokenizer(tmp_path / "decoder.pkl")
    assert str(info.value) == (f"{tmp_path / 'decoder.pkl'} is a pickled dall_e.decoder.Decoder, DALL-E's decoder, "
                               f"not its encoder; BEiT's tokenizer is the encoder: pass encoder.pkl (or its conversion "
                               f"by `lomar tokenizer convert` (lomar.tokenizers.convert_dvae))")


def test_another_models_state_dict_says_what_to_pass(tmp_path):
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(2, 3, 4, 4)}, "epoch": 3}, tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"vit\.pth: not a dVAE encoder state dict: missing .*; pass DALL-E's "
                                         r"encoder\.pkl or its conversion by `lomar tokenizer convert`"):
        load_tokenizer(tmp_path / "vit.pth")


def test_a_cut_short_download_in_torchs_legacy_format_is_not_called_a_plain_pickle(tmp_path):
    """DALL-E's encoder.pkl era wrote torch.save's legacy format; cut short, it was 'a Python pickle, not a
    checkpoint written by torch.save, which only a full unpickling (that could run code) would read'."""
    from lomar.tokenizers import DVAEConfig, DVAEEncoder

    whole = tmp_path / "encoder.pkl"
    torch.save({"model": DVAEEncoder(DVAEConfig(n_hid=4, n_blk_per_group=1, vocab_size=8)).state_dict()}, whole,
               _use_new_zipfile_serialization=False)
    for size in (12, whole.stat().st_size // 2):
        (tmp_path / "cut.pkl").write_bytes(whole.read_bytes()[:size])
        with pytest.raises(ValueError, match=r"cut\.pkl: it is a torch\.save checkpoint in the legacy format \(before "
                                             r"PyTorch 1\.6\) that is cut short or damaged \(download or save it "
                                             r"again\); use the official encoder\.pkl"):
            load_tokenizer(tmp_path / "cut.pkl")
