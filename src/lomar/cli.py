"""The ``lomar`` command. Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# (name, module, one-line help). Modules are imported when the parser is built.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("bench", "lomar.bench", "time LoMaR vs MAE training steps across image sizes on this machine"),
    ("pretrain", "lomar.pretrain", "pretrain an encoder with LoMaR or MAE (no arguments: a demo on CPU)"),
]


class UsageError(ValueError):
    """A bad flag or configuration: reported in one line, exit code 2, before any work."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lomar",
        description="Self-supervised ViT pretraining by local masked reconstruction (LoMaR).",
    )
    parser.add_argument("--version", action="version", version=f"lomar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
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
