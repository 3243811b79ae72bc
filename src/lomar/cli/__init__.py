"""The ``lomar`` command line, on top of the library (which never imports this package)."""

from lomar.cli.app import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
