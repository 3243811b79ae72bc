"""The ``lomar`` command. Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import sys

from lomar import __version__
from lomar.errors import UsageError

# (name, "module" or "module:prefix", one-line help): the module provides add_arguments/run,
# or <prefix>_add_arguments/<prefix>_run when one module serves several commands.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("bench", "lomar.cli.bench", "time LoMaR vs MAE training steps across image sizes on this machine"),
    ("pretrain", "lomar.cli.pretrain", "pretrain an encoder with LoMaR or MAE (no arguments: a demo on CPU)"),
    ("finetune", "lomar.train.finetune", "finetune a pretrained encoder for classification (original recipe)"),
    ("linprobe", "lomar.cli.probe:linprobe", "linear probe (BatchNorm + linear) on frozen features"),
    ("knn", "lomar.cli.probe:knn", "cosine k-NN accuracy of frozen features"),
    ("export", "lomar.cli.export", "write a checkpoint's encoder as model.safetensors + config.json (timm-ready)"),
    ("visualize", "lomar.cli.visualize", "reconstruction and attention figures of a pretrained model"),
    ("tokenizer", "lomar.cli.tokenizer", "BEiT visual tokenizers: fit a k-means one on images, convert a dVAE"),
    ("load-original", "lomar.checkpoints.convert", "convert an original LoMaR / MAE checkpoint into ours"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lomar",
        description="Self-supervised ViT pretraining by local masked reconstruction (LoMaR).",
    )
    parser.add_argument("--version", action="version", version=f"lomar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target, help_text in SUBCOMMANDS:
        module_name, _, prefix = target.partition(":")
        module = importlib.import_module(module_name)
        prefix = f"{prefix}_" if prefix else ""
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, f"{prefix}add_arguments")(sub_parser)
        sub_parser.set_defaults(_run=getattr(module, f"{prefix}run"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"lomar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lomar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
