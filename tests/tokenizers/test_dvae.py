"""DALL-E dVAE encoder on every ``dvae_meta.json`` case, in all three file forms, and the
refusal of pickles that would run code."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import reference_cases, require_reference
from lomar.tokenizers import DVAEConfig, DVAEEncoder, convert_dvae, load_dvae, load_tokenizer, map_pixels

ATOL, RTOL = 1e-5, 1e-4
META = "dvae_meta.json"


@pytest.mark.parametrize("form", ["pkl", "state", "safetensors"])
@pytest.mark.parametrize("case", reference_cases(META))
def test_dvae_case(case, form, tmp_path):
    require_reference(case)
    meta = json.loads((case / META).read_text())
    data = {k: torch.from_numpy(v) for k, v in np.load(case / "dvae_case.npz").items()}
    if form == "safetensors":
        path = convert_dvae(case / "dvae_encoder.pkl", tmp_path / "dvae.safetensors")
        assert [p.name for p in tmp_path.iterdir()] == ["dvae.safetensors"]  # no temporary left behind
    else:
        path = case / ("dvae_encoder.pkl" if form == "pkl" else "dvae_encoder_state.pth")
    model = load_tokenizer(path)
    assert isinstance(model, DVAEEncoder)
    cfg = model.config
    assert (cfg.n_hid, cfg.n_blk_per_group, cfg.input_channels, cfg.vocab_size, cfg.group_count) == (
        meta["n_hid"], meta["n_blk_per_group"], meta["input_channels"], meta["vocab_size"], meta["group_count"])
    assert cfg.widths == meta["group_widths"]
    assert [b.post_gain for b in model.modules() if hasattr(b, "post_gain")][0] == meta["post_gain"]
    x = data["x"]
    torch.testing.assert_close(map_pixels(x, meta["logit_laplace_eps"]), data["x_mapped"], atol=1e-7, rtol=0)
    with torch.no_grad():
        logits = model.logits(map_pixels(x, meta["logit_laplace_eps"]))
    torch.testing.assert_close(logits, data["logits"], atol=ATOL, rtol=RTOL)
    assert logits.shape[-2:] == tuple(meta["grid"])
    if tuple(x.shape[-2:]) == (model.input_size, model.input_size):
        assert torch.equal(model.tokens(x), data["tokens"].flatten(1))
    assert torch.equal(logits.argmax(1), data["tokens"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dVAE's fp16 convolutions run on CUDA only")
@pytest.mark.parametrize("case", reference_cases(META))
def test_dvae_case_on_cuda_runs_its_convs_in_fp16_as_the_original(case, monkeypatch):
    """On CUDA every conv but the output one runs in fp16, as the original's did when it made BEiT's labels: the
    logits come out fp32 on the device, within fp16's rounding of the CPU reference's (fp32), the same tokens but
    for near ties."""
    require_reference(case)
    meta = json.loads((case / META).read_text())
    data = {k: torch.from_numpy(v) for k, v in np.load(case / "dvae_case.npz").items()}
    model = load_tokenizer(case / "dvae_encoder.pkl").cuda()
    inputs, conv2d = [], torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda x, w, *args, **kwargs: inputs.append(
        (x.dtype, w.dtype, x.device.type)) or conv2d(x, w, *args, **kwargs))
    with torch.no_grad():
        logits = model.logits(map_pixels(data["x"].cuda(), meta["logit_laplace_eps"]))
    half, full = (torch.float16,) * 2 + ("cuda",), (torch.float32,) * 2 + ("cuda",)
    assert inputs == [half] * (len(inputs) - 1) + [full]
    assert logits.dtype == torch.float32 and logits.device.type == "cuda"
    want, got = data["logits"], logits.cpu()
    assert float((got - want).abs().max()) < 2e-2 * float(want.abs().max())  # fp16 on the CPU: 1.5e-3
    assert float((got.argmax(1) == data["tokens"]).float().mean()) > 0.9  # fp16 on the CPU: all equal


def _evil(path: Path, marker: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    torch.save({"model": Evil()}, path)
    return path


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_malicious_pickle_is_refused_without_running(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = _evil(tmp_path / f"encoder{suffix}", marker)
    with pytest.raises(ValueError, match="system") as info:
        load_tokenizer(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


class NotAllowed:  # a harmless class that is still not on the list
    pass


def test_unknown_class_and_other_errors(tmp_path):
    torch.save(NotAllowed(), tmp_path / "x.pkl")
    with pytest.raises(ValueError, match="NotAllowed"):
        load_dvae(tmp_path / "x.pkl")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.pkl")


def test_a_plain_pickle_is_named_as_one(tmp_path):
    import pickle

    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": NotAllowed()}, protocol=4))  # torch cannot name it
    with pytest.raises(ValueError, match=r"refusing to load .*plain.pkl: it is a Python pickle, not a checkpoint "
                                         r"written by torch.save, which only a full unpickling"):
        load_dvae(tmp_path / "plain.pkl")
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "y.pth")
    with pytest.raises(ValueError, match="blocks.input.w"):
        load_dvae(tmp_path / "y.pth")
    model = DVAEEncoder(DVAEConfig(n_hid=16, vocab_size=64))
    with pytest.raises(ValueError, match="112"):
        model.tokens(torch.zeros(1, 3, 64, 64))


def test_the_official_configuration_has_the_official_keys_and_shapes():
    # The golden case has one block a group; the official encoder has two (BEIT_SPEC §3), whose second
    # block keeps its width (no id_path), and four groups of widths 256, 512, 1024, 2048.
    with torch.device("meta"):
        encoder = DVAEEncoder()  # the official configuration by default
    assert encoder.config == DVAEConfig()
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert len(shapes) == 74 and sum(torch.Size(s).numel() for s in shapes.values()) == 53_786_240
    assert shapes["blocks.input.w"] == (256, 3, 7, 7)
    assert shapes["blocks.group_1.block_2.res_path.conv_1.w"] == (64, 256, 3, 3)
    assert "blocks.group_1.block_2.id_path.w" not in shapes and "blocks.group_1.block_1.id_path.w" not in shapes
    assert shapes["blocks.group_2.block_1.id_path.w"] == (512, 256, 1, 1)
    assert shapes["blocks.group_4.block_2.res_path.conv_4.w"] == (2048, 512, 1, 1)
    assert shapes["blocks.output.conv.w"] == (8192, 2048, 1, 1)
    gains = {m.post_gain for m in encoder.modules() if hasattr(m, "post_gain")}
    assert gains == {1 / 64}  # 1 / (4 groups x 2 blocks)^2


def test_a_new_encoder_starts_as_dall_es_convs_and_keeps_its_output_conv_in_fp32():
    # BEIT_SPEC §3: each conv starts w ~ N(0, 1/(in·k²)), b = 0; on CUDA every conv but the output one runs in fp16
    from lomar.tokenizers.dvae import Conv

    torch.manual_seed(0)
    encoder = DVAEEncoder(DVAEConfig(n_hid=64, n_blk_per_group=1, vocab_size=512))
    convs = {name: m for name, m in encoder.named_modules() if isinstance(m, Conv)}
    for name, conv in convs.items():
        n_out, n_in, k, _ = conv.w.shape
        assert abs(conv.w.std().item() * (n_in * k * k) ** 0.5 - 1) < 0.1, name
        assert torch.count_nonzero(conv.b) == 0, name
    assert [name for name, conv in convs.items() if not conv.use_float16] == ["blocks.output.conv"]


@pytest.mark.parametrize("groups", [3, 4])
def test_the_stride_and_grid_are_the_logits_downsampling(groups):
    """BEiT sizes the tokenizer's input from ``stride`` (its grid times the stride): 2^(groups - 1), the max pools'."""
    torch.manual_seed(0)
    encoder = DVAEEncoder(DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=16, group_count=groups, input_size=32))
    with torch.no_grad():
        logits = encoder(torch.rand(1, 3, 32, 32))
    assert encoder.stride == 2 ** (groups - 1) and logits.shape[-2:] == encoder.grid == (32 // encoder.stride,) * 2


def test_float64_images_are_tokenized_as_float32_ones():
    """On the CPU the convs cast their input to the weights' float32: a float64 batch of images is read as the same
    pixels (mapped in float64), not refused by conv2d for its dtype."""
    torch.manual_seed(0)
    encoder = DVAEEncoder(DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=16, group_count=3, input_size=16))
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        logits = encoder(images.double())
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, encoder(images).detach(), atol=1e-5, rtol=1e-4)
