"""Any checkpoint -> a model, and ``lomar load-original``: original checkpoint -> ours.

:func:`load_model` (from :mod:`lomar.checkpoints.formats`, which detects and reads every
format) is re-exported here for the commands; this module writes our checkpoints.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from torch import nn

from lomar.checkpoints.formats import CLASSIFIER_FORMAT, PRETRAIN_FORMAT, load_model, load_original
from lomar.checkpoints.io import atomic_save
from lomar.models.vit import MODEL_SIZES, PATCH_SIZES, VisionTransformer

__all__ = ["load_model", "encoder_of", "pretrain_checkpoint", "add_override_arguments", "overrides_from_args",
           "add_arguments", "run", "PRETRAIN_FORMAT", "CLASSIFIER_FORMAT"]


def encoder_of(model: nn.Module) -> VisionTransformer:
    """The encoder of a LoMaR / MAE model, or the VisionTransformer itself."""
    encoder = getattr(model, "encoder", model)
    if not isinstance(encoder, VisionTransformer):
        raise TypeError(f"{type(model).__name__} has no ViT encoder")
    return encoder


# ---- writing -------------------------------------------------------------------------------
def pretrain_checkpoint(model: nn.Module, source: str | None = None) -> dict:
    """Our checkpoint of a LoMaR / MAE model: ``{"model", "config", "format", "source"}``.

    ``config`` is a full pretraining config (``lomar pretrain`` flags), so the checkpoint is
    readable by ``lomar export``, ``lomar visualize`` and ``--pretrained``. A classifier is
    written as ``{"model", "vit_config", "num_classes", "format": "lomar-classifier-1"}``.
    """
    from lomar.models import MAE, LoMaR
    from lomar.train.config import PretrainConfig, build_model

    vit = encoder_of(model).config
    if isinstance(model, VisionTransformer):
        return {"model": model.state_dict(), "vit_config": vit.to_dict(), "num_classes": model.num_classes,
                "format": CLASSIFIER_FORMAT, "source": source}
    if vit.mlp_ratio != 4.0 or vit.in_chans != 3:
        raise ValueError(f"only MLP ratio 4 and 3 input channels can be described by a pretraining config "
                         f"(got {vit.mlp_ratio}, {vit.in_chans})")
    shape = (vit.embed_dim, vit.depth, vit.num_heads)
    size = next((s for s, v in MODEL_SIZES.items() if v == shape), "base")
    patch = vit.patch_size if vit.patch_size in PATCH_SIZES else 16
    values = dict(model=f"vit_{size}_patch{patch}", embed_dim=vit.embed_dim, depth=vit.depth,
                  num_heads=vit.num_heads, patch_size=vit.patch_size, img_size=vit.img_size, pos=vit.pos,
                  norm_pix_loss=model.norm_pix_loss, mask_ratio=model.mask_ratio)
    if isinstance(model, LoMaR):
        values.update(method="lomar", window_size=model.window_size, windows=model.num_windows)
    elif isinstance(model, MAE):
        settings = model.decoder_settings
        values.update(method="mae", decoder_embed_dim=settings["decoder_embed_dim"],
                      decoder_depth=settings["decoder_depth"], decoder_num_heads=settings["decoder_num_heads"])
    else:
        raise TypeError(f"cannot write a pretraining checkpoint for {type(model).__name__}")
    config = PretrainConfig(**values)
    state = model.state_dict()
    build_model(config).load_state_dict(state, strict=True)  # proves the checkpoint rebuilds
    return {"model": state, "config": config.to_dict(), "format": PRETRAIN_FORMAT, "source": source}


# ---- shared CLI flags ------------------------------------------------------------------------
def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("for original checkpoints (what the weights cannot tell)")
    group.add_argument("--num-heads", type=int, help="attention heads (needed for non-standard widths "
                                                     "without an RPE table)")
    group.add_argument("--img-size", type=int, help="pretraining image size (default: from the checkpoint, "
                                                    "else 224)")
    group.add_argument("--window-size", type=int, help="LoMaR window size K (default 7)")
    group.add_argument("--windows", type=int, dest="num_windows", help="LoMaR windows per image (default 4)")
    group.add_argument("--decoder-num-heads", type=int, help="MAE decoder heads (default 16 for 512 wide)")


def overrides_from_args(args: argparse.Namespace) -> dict:
    names = ("num_heads", "img_size", "window_size", "num_windows", "decoder_num_heads")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def load_for_cli(path: str, args: argparse.Namespace) -> nn.Module:
    from lomar.errors import UsageError

    try:
        return load_model(path, **overrides_from_args(args))
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise UsageError(_as_flags(str(exc))) from None


def _as_flags(message: str) -> str:
    """The library's "pass num_heads=... to load_original" becomes the command line's "pass --num-heads"."""
    return re.sub(r"pass (\w+)=\.\.\. to load_original", lambda m: f"pass --{m[1].replace('_', '-')}", message)


# ---- lomar load-original ---------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("The output is our pretraining checkpoint ({model, config}): use it with `lomar export`, "
                     "`lomar visualize` or as `--pretrained` for finetuning. It holds no optimizer state, "
                     "so it is not a checkpoint to --resume pretraining from.")
    parser.add_argument("path", metavar="PATH", help="original LoMaR / MAE checkpoint (.pth)")
    parser.add_argument("--to", required=True, metavar="CKPT", help="where to write our checkpoint (.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace CKPT if it exists")
    add_override_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lomar.errors import UsageError

    out = Path(args.to)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--to {out} already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise UsageError(f"--to {out} is a folder; give a file name such as {out / 'converted.pt'}")
    try:
        model = load_original(args.path, **overrides_from_args(args))
        ckpt = pretrain_checkpoint(model, source=str(args.path))
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise UsageError(_as_flags(str(exc))) from None
    atomic_save(ckpt, out)
    vit = encoder_of(model).config
    params = sum(p.numel() for p in model.parameters())
    kind = ckpt["config"]["method"] if "config" in ckpt else "classifier"
    print(f"lomar: converted {args.path} ({kind}, {vit.embed_dim} wide, {vit.depth} blocks, {vit.num_heads} "
          f"heads, patch {vit.patch_size}, {params / 1e6:.2f} M parameters) -> {out}")
    print(f"lomar: next: lomar export {out} --to DIR   |   lomar visualize {out} IMAGE...")
    return 0
