"""The device's JPEG decoders (``--gpu-decoder``): torchvision's everywhere, nvImageCodec's hardware
engines on a CUDA machine that has the package (compared there with torchvision's pixels)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lomar.data import gpu_jpeg
from lomar.data.fast_decode import gpu_decode_crops
from lomar.data.gpu_jpeg import decode_jpegs, frees_outside_torch, nvimgcodec_missing


def _jpeg(height: int, width: int, seed: int = 0, mode: str = "RGB") -> torch.Tensor:
    """A smooth picture with edges, JPEG-encoded (4:2:0, as cameras write them): its file's bytes."""
    y, x = np.mgrid[0:height, 0:width]
    a, b = np.random.RandomState(seed).randint(1, 5, size=2)
    pixels = np.stack([(x * a // 3) % 256, (y * b // 3) % 256, ((x + y) // 4 + 60 * seed) % 256], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(buffer, "JPEG", quality=90)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def test_torchvision_decodes_rgb_even_from_grayscale_files():
    images = decode_jpegs([_jpeg(48, 64), _jpeg(40, 32, mode="L")], "cpu")
    assert [tuple(image.shape) for image in images] == [(3, 48, 64), (3, 40, 32)]
    assert all(image.dtype == torch.uint8 for image in images)
    assert torch.equal(images[1][0], images[1][2])  # gray: three equal planes
    assert not frees_outside_torch("torchvision") and frees_outside_torch("nvimgcodec")


def test_a_decoder_that_cannot_run_here_says_why():
    with pytest.raises(ValueError, match="not cpu; use --gpu-decoder torchvision"):
        decode_jpegs([_jpeg(16, 16)], "cpu", "nvimgcodec")
    with pytest.raises(ValueError, match="torchvision or nvimgcodec; got 'dali'"):
        decode_jpegs([_jpeg(16, 16)], "cpu", "dali")


def test_a_missing_package_names_its_install(monkeypatch):
    monkeypatch.setattr(gpu_jpeg.importlib.util, "find_spec", lambda name: None)
    assert "pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg" in nvimgcodec_missing()

    def no_namespace(name):
        raise ModuleNotFoundError("No module named 'nvidia'")
    monkeypatch.setattr(gpu_jpeg.importlib.util, "find_spec", no_namespace)
    assert "not installed" in nvimgcodec_missing()
    monkeypatch.setattr(gpu_jpeg.importlib.util, "find_spec", lambda name: object())
    assert nvimgcodec_missing() is None


needs_hardware_decoder = pytest.mark.skipif(not torch.cuda.is_available() or nvimgcodec_missing() is not None,
                                            reason="needs CUDA and nvImageCodec")


@needs_hardware_decoder
def test_nvimgcodec_on_cuda_gives_torchvisions_pixels():
    datas = [_jpeg(900, 1200, seed) for seed in range(3)] + [_jpeg(601, 803, 3, mode="L")]
    hardware = decode_jpegs(datas, "cuda", "nvimgcodec")
    reference = decode_jpegs(datas, "cuda")
    for got, want in zip(hardware, reference):
        assert got.shape == want.shape and got.dtype == torch.uint8 and got.device.type == "cuda"
        difference = (got.float() - want.float()).abs()
        # The two upsample 4:2:0 chroma differently, which moves pixels at this pattern's hard colour edges by
        # tens of levels (H200: mean 0.50, 99th percentile 21); a swapped channel or axis moves the mean by tens.
        assert difference.mean() < 2.0 and torch.quantile(difference.flatten()[::97], 0.99) <= 40, (
            f"mean {difference.mean():.2f}, max {difference.max():.0f}")
    torch.cuda.current_stream().synchronize()


@needs_hardware_decoder
def test_nvimgcodec_crops_on_cuda_match_torchvisions():
    datas = [_jpeg(900, 1200, seed) for seed in range(4)]
    boxes, flips = [(0, 0, 900, 1200), (100, 200, 500, 400), (10, 700, 600, 480), (300, 0, 599, 1199)], \
        [False, True, False, True]
    hardware = gpu_decode_crops(datas, boxes, 112, flips, "cuda", "nvimgcodec")
    reference = gpu_decode_crops(datas, boxes, 112, flips, "cuda")
    assert hardware.shape == reference.shape == (4, 3, 112, 112)
    difference = (hardware.float() - reference.float()).abs()
    assert difference.mean() < 2.0, f"mean {difference.mean():.2f}, max {difference.max():.0f}"
