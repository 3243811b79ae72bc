"""load_dvae: the input_size asked for, whatever the file form, and a state dict that holds other things named."""

from __future__ import annotations

import pytest
import torch

from lomar.tokenizers import DVAEConfig, DVAEEncoder, convert_dvae, load_dvae


@pytest.mark.parametrize("form", ["state", "safetensors"])
def test_the_input_size_asked_for_is_the_loaded_encoders(tmp_path, form):
    torch.manual_seed(0)
    encoder = DVAEEncoder(DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=16, group_count=3, input_size=16))
    path = tmp_path / "dvae.pth"
    torch.save({"model": encoder.state_dict()}, path)
    if form == "safetensors":
        path = convert_dvae(path, tmp_path / "dvae.safetensors")
    loaded = load_dvae(path, input_size=48)
    assert loaded.input_size == 48 and loaded.config.input_size == 48
    images = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    assert loaded.tokens(images).shape == (1, 12 * 12)  # 3 groups: stride 4


@pytest.mark.parametrize("held", [{"model": {"encoder.blocks.input.w": 1}}, {"model": [torch.zeros(1)]}])
def test_a_state_dict_of_other_things_than_tensors_is_named(tmp_path, held):
    torch.save(held, tmp_path / "dvae.pth")
    with pytest.raises(ValueError, match=r"the state dict holds non-tensors; expected \{'model': state_dict\}$"):
        load_dvae(tmp_path / "dvae.pth")
