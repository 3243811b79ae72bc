"""``lomar load-original PATH --to CKPT``: an original LoMaR / MAE checkpoint -> our pretraining checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from lomar.cli.common import add_override_arguments, as_flags, check_output_file, overrides_from_args
from lomar.errors import UsageError
from lomar.train import settings as S
from lomar.train.settings import Setting, add_settings

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("The output is our pretraining checkpoint ({model, config}): use it with `lomar export`, "
                     "`lomar visualize` or as `--pretrained` for finetuning. It holds no optimizer state, "
                     "so it is not a checkpoint to --resume pretraining from.")
    add_settings(parser, {
        "path": Setting(None, "original LoMaR / MAE checkpoint (.pth)", kind=str, flag="", metavar="PATH"),
        "to": S.TO.but(metavar="CKPT", help="where to write our checkpoint (.pt)"),
        "overwrite": S.OVERWRITE.but(help="replace CKPT if it exists"),
    })
    add_override_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lomar.checkpoints.convert import encoder_of, pretrain_checkpoint  # torch: not for --help
    from lomar.checkpoints.io import atomic_save  # torch: not for --help
    from lomar.checkpoints.original import load_original  # torch: not for --help

    out = Path(args.to)
    check_output_file(out, "--to", overwrite=args.overwrite)
    if not Path(args.path).is_file():
        raise UsageError(f"{args.path} is not a file; pass an original LoMaR / MAE checkpoint (.pth)")
    try:
        model = load_original(args.path, **overrides_from_args(args))
        ckpt = pretrain_checkpoint(model, source=str(args.path))
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise UsageError(as_flags(str(exc))) from None
    atomic_save(ckpt, out)
    vit = encoder_of(model).config
    params = sum(p.numel() for p in model.parameters())
    kind = ckpt["config"]["method"] if "config" in ckpt else "classifier"
    print(f"lomar: converted {args.path} ({kind}, {vit.embed_dim} wide, {vit.depth} blocks, {vit.num_heads} "
          f"heads, patch {vit.patch_size}, {params / 1e6:.2f} M parameters) -> {out}")
    print(f"lomar: next: lomar export {out} --to DIR   |   lomar visualize {out} IMAGE...")
    return 0
