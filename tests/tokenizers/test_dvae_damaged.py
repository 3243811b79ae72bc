"""A damaged dVAE file is refused when read, not used as BEiT's tokenizer."""

import pytest
import torch


def test_a_dvae_with_nan_weights_is_refused_not_used_as_a_tokenizer(tmp_path):
    """Its NaN logits label every patch with token 0: a BEiT run would have trained on one target without a word."""
    from lomar.tokenizers import DVAEConfig, DVAEEncoder, load_tokenizer

    state = DVAEEncoder(DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=10)).state_dict()
    state["blocks.input.w"][0, 0, 0, 0] = float("nan")
    torch.save({"model": state}, tmp_path / "dvae.pt")
    with pytest.raises(ValueError, match=r"dvae.pt: blocks.input.w holds NaN or infinite values; the file is damaged"):
        load_tokenizer(tmp_path / "dvae.pt")
