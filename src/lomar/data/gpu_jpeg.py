"""The device's JPEG decoders for ``lomar pretrain --decode gpu`` (``--gpu-decoder``).

- ``torchvision``: torchvision's batched nvjpeg decoder (the default; ships with torchvision).
- ``nvimgcodec``: NVIDIA's nvImageCodec, restricted to the GPU's hardware JPEG engines (NVJPG, on the
  A100, H100 and H200), with its hybrid CPU + GPU backend for what the engines refuse. An optional
  package: ``pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg``.

Why two: the engines decode beside the streaming multiprocessors, not on them. On an H200, beside the
eager ViT-B step, they decoded more photos than torchvision's nvjpeg and cost the step less (it kept
67-77 % of its rate against 57-64 % in the same calls), though neither leaves the step its whole rate:
what it loses is late launches, not SM time (``benchmarks/step_beside_decode.py``, ``benchmarks/README.md``).
"""

from __future__ import annotations

import importlib.util
import threading
import warnings

import torch

__all__ = ["nvimgcodec_missing", "decode_jpegs", "frees_outside_torch"]

_NVIMGCODEC_FIX = "pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg (CUDA 13), or use --gpu-decoder torchvision"


def nvimgcodec_missing() -> str | None:
    """Why nvImageCodec cannot be imported here (one line naming the fix), or None. Does not import it:
    its import loads CUDA libraries and logs the optional codecs it lacks."""
    try:
        found = importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except ModuleNotFoundError:  # no ``nvidia`` namespace package at all
        found = False
    return None if found else f"the nvImageCodec package is not installed; {_NVIMGCODEC_FIX}"


def frees_outside_torch(decoder: str) -> bool:
    """Whether ``decoder``'s images live in memory that torch's stream-ordered allocator does not manage:
    the caller synchronises its stream before dropping them (:func:`decode_jpegs`)."""
    return decoder == "nvimgcodec"


_decoders: dict[int, tuple] = {}
_lock = threading.Lock()


def _nvimgcodec(device_index: int):
    """One nvImageCodec decoder per device, made on first use (its construction loads the codecs)."""
    with _lock:
        if device_index not in _decoders:
            from nvidia import nvimgcodec

            backends = [nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY),
                        nvimgcodec.Backend(nvimgcodec.BackendKind.HYBRID_CPU_GPU)]
            params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB)
            decoder = nvimgcodec.Decoder(device_id=device_index, backends=backends)
            _decoders[device_index] = decoder, params, nvimgcodec.CodeStream
        return _decoders[device_index]


def decode_jpegs(datas: list[torch.Tensor], device: torch.device | str, decoder: str = "torchvision"
                 ) -> list[torch.Tensor]:
    """Decode JPEG files (uint8 (n,) tensors of their bytes) on ``device`` with ``decoder``: uint8
    (3, H, W) RGB per file, EXIF orientation not applied, ordered on the current CUDA stream.

    RuntimeError if any file fails (the caller retries one by one). With ``nvimgcodec`` the images are
    views of nvImageCodec's own buffers: synchronise the stream before dropping them
    (:func:`frees_outside_torch`).
    """
    if decoder not in ("torchvision", "nvimgcodec"):
        raise ValueError(f"--gpu-decoder must be torchvision or nvimgcodec; got {decoder!r}")
    if decoder == "torchvision":
        with warnings.catch_warnings():  # torchvision 0.29's notice of its decoders' move to torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"--gpu-decoder nvimgcodec decodes on a CUDA device, not {device}; "
                         f"use --gpu-decoder torchvision")
    index = torch.cuda.current_device() if device.index is None else device.index
    nvdecoder, params, code_stream = _nvimgcodec(index)
    stream = torch.cuda.current_stream(device)
    images = nvdecoder.decode([code_stream(data.numpy()) for data in datas], params=params,
                              cuda_stream=stream.cuda_stream)
    if any(image is None for image in images):
        stream.synchronize()  # the decoded ones' buffers go with this frame
        refused = [i for i, image in enumerate(images) if image is None]
        raise RuntimeError(f"nvImageCodec could not decode {len(refused)} of {len(images)} files (rows {refused})")
    # (H, W, 3) -> (3, H, W) views; each tensor holds its image (and so the buffer) alive
    return [torch.as_tensor(image, device=device).permute(2, 0, 1) for image in images]
