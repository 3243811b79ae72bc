"""The DALL-E dVAE encoder, BEiT's tokenizer (BEIT_SPEC §3), and safe loading of its files.

The official ``encoder.pkl`` is a whole pickled module naming ``dall_e`` classes. It is read
with ``torch.load(weights_only=True)``, where only inert stand-ins for those classes (and the
plain torch.nn containers it pickles) are allowed: nothing in the file can run code. The
stand-ins just keep their pickled ``__dict__``; the tensors are read out of it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from lomar.checkpoints.io import atomic_write_bytes, describe_file, quiet_pickle_protocol
from lomar.tokenizers.base import (
    CONVERT_HINT,
    FORMAT_KEY,
    Tokenizer,
    check_tokenizer_file,
    is_safetensors,
    safetensors_metadata,
)
from lomar.tokenizers.kmeans import FORMAT as KMEANS_FORMAT

__all__ = ["DVAEConfig", "DVAEEncoder", "map_pixels", "load_dvae", "convert_dvae", "dvae_from_pickled", "FORMAT"]

FORMAT = "dall_e_dvae_encoder"
LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] → [eps, 1 − eps]: (1 − 2·eps)·x + eps, the only input normalisation the dVAE sees."""
    return (1 - 2 * eps) * x + eps


# Upper bounds far above the official encoder (256 / 2 / 3 / 8192 / 4, 112 px views) that keep a
# crafted file's settings from describing a model of many gigabytes before its shapes are checked.
_BOUNDS = {"n_hid": 4096, "n_blk_per_group": 16, "input_channels": 16, "vocab_size": 65536, "group_count": 8,
           "input_size": 8192}


@dataclass(frozen=True)
class DVAEConfig:
    n_hid: int = 256
    n_blk_per_group: int = 2
    input_channels: int = 3
    vocab_size: int = 8192
    group_count: int = 4
    input_size: int = 112  # the view BEiT tokenizes; any multiple of the stride runs through logits()

    def __post_init__(self) -> None:
        for name, most in _BOUNDS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= most:
                raise ValueError(f"DVAEConfig.{name}={value!r} must be an integer in [1, {most}] "
                                 f"(the official encoder: {getattr(DVAEConfig, name)})")
        if self.n_hid % 4:
            raise ValueError(f"n_hid={self.n_hid} must be a multiple of 4 (blocks use width/4); official is 256")
        stride = 2 ** (self.group_count - 1)
        if self.input_size % stride:
            raise ValueError(f"input_size={self.input_size} is not a multiple of the stride {stride}; use e.g. 112")

    @property
    def widths(self) -> list[int]:
        return [self.n_hid * 2 ** g for g in range(self.group_count)]


class Conv(nn.Module):
    """Conv k×k, stride 1, zero padding (k−1)/2, parameters ``w`` (out, in, k, k) and ``b`` (out,)."""

    def __init__(self, n_in: int, n_out: int, kw: int, use_float16: bool = True):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw * kw) ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))
        self.use_float16 = use_float16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.w, self.b
        if self.use_float16 and x.is_cuda:
            # The original's training labels came from fp16 convs on CUDA; keep that arithmetic there.
            x, w, b = x.half(), w.half(), b.half()
        elif x.dtype != w.dtype:
            x = x.to(w.dtype)
        return F.conv2d(x, w, b, padding=(w.shape[-1] - 1) // 2)


class EncoderBlock(nn.Module):
    """y = id(x) + post_gain · res(x), res = 4 ReLU→conv steps (3×3, 3×3, 3×3, 1×1) at width out/4."""

    def __init__(self, n_in: int, n_out: int, post_gain: float):
        super().__init__()
        hid = n_out // 4
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else None
        self.res_path = nn.ModuleDict({"conv_1": Conv(n_in, hid, 3), "conv_2": Conv(hid, hid, 3),
                                       "conv_3": Conv(hid, hid, 3), "conv_4": Conv(hid, n_out, 1)})
        self.post_gain = post_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = x
        for conv in self.res_path.values():
            res = conv(F.relu(res))
        identity = x if self.id_path is None else self.id_path(x)
        return identity + self.post_gain * res.to(identity.dtype)


class DVAEEncoder(Tokenizer):
    """Images (N, 3, H, W) → logits (N, vocab, H/8, W/8); tokens = argmax over the vocabulary."""

    def __init__(self, config: DVAEConfig | None = None):
        super().__init__()
        self.config = config = config or DVAEConfig()
        self.vocab_size, self.input_size = config.vocab_size, config.input_size
        self.stride = 2 ** (config.group_count - 1)
        post_gain = 1 / (config.group_count * config.n_blk_per_group) ** 2
        widths = config.widths
        blocks: dict[str, nn.Module] = {"input": Conv(config.input_channels, config.n_hid, 7)}
        for g, (n_in, width) in enumerate(zip([config.n_hid, *widths], widths), start=1):
            group = {f"block_{b}": EncoderBlock(width if b > 1 else n_in, width, post_gain)
                     for b in range(1, config.n_blk_per_group + 1)}
            blocks[f"group_{g}"] = nn.ModuleDict(group)
        blocks["output"] = nn.ModuleDict({"conv": Conv(widths[-1], config.vocab_size, 1, use_float16=False)})
        self.blocks = nn.ModuleDict(blocks)

    def logits(self, x_mapped: torch.Tensor) -> torch.Tensor:
        """x_mapped (N, 3, H, W) already through :func:`map_pixels` → (N, vocab, H/s, W/s) float32."""
        x = self.blocks["input"](x_mapped)
        for g in range(1, self.config.group_count + 1):
            if g > 1:
                x = F.max_pool2d(x, 2)
            for block in self.blocks[f"group_{g}"].values():
                x = block(x)
        return self.blocks["output"]["conv"](F.relu(x).float())

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """images01 (N, 3, H, W) in [0, 1] → logits (N, vocab, H/s, W/s)."""
        return self.logits(map_pixels(images01))

    def _tokens(self, images01: torch.Tensor) -> torch.Tensor:
        return self(images01).argmax(dim=1)

    def metadata(self) -> dict[str, str]:
        return {FORMAT_KEY: FORMAT, **{k: str(v) for k, v in asdict(self.config).items()}}


# ---------------------------------------------------------------- loading
class _Inert:
    """Stand-in for a pickled class: keeps the pickled state, runs nothing."""

    pickled_name = "?"

    def __setstate__(self, state: dict) -> None:
        self.state = state if isinstance(state, dict) else {"_state": state}


_PICKLED_CLASSES = ("dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock", "dall_e.utils.Conv2d",
                    "torch.nn.modules.container.Sequential", "torch.nn.modules.activation.ReLU",
                    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.linear.Identity")
_STAND_INS = [(type(name.rsplit(".", 1)[1], (_Inert,), {"pickled_name": name}), name) for name in _PICKLED_CLASSES]


def _read(path: Path):
    try:
        with torch.serialization.safe_globals(_STAND_INS), quiet_pickle_protocol():  # encoder.pkl is a plain pickle
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        kind = describe_file(path)
        if found and found[1].startswith("dall_e.decoder."):  # downloaded beside encoder.pkl; nothing of it ran
            raise ValueError(f"{path} is a pickled {found[1]}, DALL-E's decoder, not its encoder; BEiT's tokenizer "
                             f"is the encoder: pass encoder.pkl (or its conversion by {CONVERT_HINT})") from exc
        what = (f"it references {found[1]}, which is not a tensor or dVAE class, so it could run code" if found
                else f"it is {kind}, which only a full unpickling (that could run code) would read"
                if "pickle" in kind else f"it is {kind}" if "cut short" in kind else f"it is {kind}, not a dVAE")
        raise ValueError(f"refusing to load {path}: {what}; use the official encoder.pkl, a {{'model': state_dict}} "
                         f"or a safetensors file from {CONVERT_HINT}") from exc


def dvae_from_pickled(obj: _Inert) -> tuple[dict, dict[str, torch.Tensor]]:
    """A loaded stand-in ``dall_e.encoder.Encoder`` → (its attrs fields, state dict with the original keys)."""
    if getattr(obj, "pickled_name", None) != "dall_e.encoder.Encoder":
        raise ValueError(f"pickled object is {getattr(obj, 'pickled_name', type(obj).__name__)}, expected "
                         f"dall_e.encoder.Encoder; is this the dVAE encoder.pkl (not decoder.pkl)?")
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # a pickle can make a module its own child: walk each once

    def walk(node, prefix: str) -> None:
        if id(node) in seen or prefix.count(".") > 8:  # the official encoder nests 4 deep
            raise ValueError(f"the pickled dVAE nests its modules in a loop or too deep (at {prefix!r}); "
                             f"the file is damaged or crafted")
        seen.add(id(node))
        attrs = node.state
        for name, param in (attrs.get("_parameters") or {}).items():
            if param is not None and not isinstance(param, torch.Tensor):
                raise ValueError(f"the pickled dVAE parameter {prefix}{name} is a {type(param).__name__}, not a tensor")
            if param is not None:
                state[prefix + name] = param.detach()
        for name, child in (attrs.get("_modules") or {}).items():
            if isinstance(child, _Inert):
                walk(child, f"{prefix}{name}.")

    walk(obj, "")
    fields = {k: obj.state[k] for k in ("n_hid", "n_blk_per_group", "input_channels", "vocab_size")
              if isinstance(obj.state.get(k), int)}
    return fields, state


def _config_from_state(state: dict[str, torch.Tensor], fields: dict) -> DVAEConfig:
    if "blocks.input.w" not in state or "blocks.output.conv.w" not in state:
        raise ValueError(f"not a dVAE encoder state dict: missing blocks.input.w / blocks.output.conv.w "
                         f"(has {sorted(state)[:4]}...); pass DALL-E's encoder.pkl or its conversion by {CONVERT_HINT}")
    for key in ("blocks.input.w", "blocks.output.conv.w"):
        if state[key].ndim != 4:
            raise ValueError(f"{key} has shape {tuple(state[key].shape)}, expected a convolution's 4 dimensions")
    groups = {int(m[1]) for k in state if (m := re.match(r"blocks\.group_(\d+)\.", k))}
    per_group = {int(m[1]) for k in state if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
    n_hid, channels = state["blocks.input.w"].shape[:2]
    inferred = dict(n_hid=n_hid, input_channels=channels, vocab_size=state["blocks.output.conv.w"].shape[0],
                    n_blk_per_group=len(per_group), group_count=len(groups))
    clash = {k: (v, inferred[k]) for k, v in fields.items() if k in inferred and int(v) != inferred[k]}
    if clash:
        raise ValueError(f"dVAE settings disagree with the tensor shapes: {clash} (stated, from shapes); "
                         f"the file is inconsistent")
    if channels != 3:  # Tokenizer.tokens feeds RGB views: any other encoder fails only mid-training
        raise ValueError(f"the dVAE has input_channels={channels}, but BEiT's tokenizer reads RGB views; use an "
                         f"encoder with 3 input channels, as DALL-E's")
    input_size = int(fields.get("input_size", 112))
    return DVAEConfig(input_size=input_size, **inferred)


def _build(state: dict[str, torch.Tensor], fields: dict, source: Path) -> DVAEEncoder:
    """The encoder holding ``state``, built only once every shape the settings imply is that of
    a stored tensor: then the model is exactly as large as the tensors already read (a crafted
    file of zero-byte tensors claiming huge widths allocates nothing)."""
    try:
        config = _config_from_state(state, fields)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    with torch.device("meta"):  # shapes without storage
        expected = {k: tuple(v.shape) for k, v in DVAEEncoder(config).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in set(expected) & set(state)
                   if tuple(state[k].shape) != expected[k] or not state[k].is_floating_point())
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not fit the dVAE encoder {config}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, wrong shape or dtype {wrong[:2]}; the file is damaged "
                         f"or not a DALL-E dVAE encoder")
    # NaN weights give NaN logits, whose argmax labels every patch alike: BEiT would train on one token silently
    bad = next((k for k, v in state.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"{source}: {bad} holds NaN or infinite values; the file is damaged: convert the official "
                         f"encoder.pkl again with {CONVERT_HINT}")
    model = DVAEEncoder(config)
    model.load_state_dict(state)
    return model.eval()


def load_dvae(path: str | Path, input_size: int | None = None) -> DVAEEncoder:
    """Read a dVAE encoder from the official pickle, ``{'model': sd}`` / a bare sd, or safetensors
    (known by its content, whatever its name). ValueError unless it reads RGB (3 input channels)."""
    path = Path(path)
    check_tokenizer_file(path, "dVAE file")
    fields: dict = {}
    if is_safetensors(path):
        meta = safetensors_metadata(path)
        if meta.get(FORMAT_KEY) == KMEANS_FORMAT:
            raise ValueError(f"{path} is a k-means tokenizer, not a dVAE encoder: it needs no conversion; pass it "
                             f"as it is to `lomar pretrain --tokenizer` (lomar.tokenizers.load_tokenizer)")
        if meta.get(FORMAT_KEY) != FORMAT:
            raise ValueError(f"{path} metadata {FORMAT_KEY}={meta.get(FORMAT_KEY)!r}, expected {FORMAT!r}; "
                             f"it is not a dVAE encoder: convert the official encoder.pkl with {CONVERT_HINT}")
        state = load_file(str(path))
        fields = {k: v for k, v in meta.items() if k in DVAEConfig.__dataclass_fields__}
        bad = {k: v for k, v in fields.items() if not v.isdecimal()}  # isdigit() takes '²', which int() refuses
        if bad:
            raise ValueError(f"{path} metadata {bad} is not a whole number; the file is damaged")
        fields = {k: int(v) for k, v in fields.items()}
    else:
        data = _read(path)
        if isinstance(data, _Inert):
            fields, state = dvae_from_pickled(data)
        elif isinstance(data, dict):
            state = data.get("model", data)
            if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items()):
                raise ValueError(f"{path}: the state dict holds non-tensors; expected {{'model': state_dict}}")
        else:
            raise ValueError(f"{path} holds a {type(data).__name__}; expected a dVAE encoder or state dict")
    if input_size is not None:
        fields["input_size"] = input_size
    return _build(state, fields, path)


def convert_dvae(src: str | Path, dst: str | Path) -> Path:
    """Any readable dVAE encoder form → a safetensors file (+ config metadata), written atomically."""
    model = load_dvae(src)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    return atomic_write_bytes(dst, save(tensors, metadata=model.metadata()))
