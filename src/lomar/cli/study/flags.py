"""A study's settings as a command's flags: a spec's mapping written as flags, and read back by the command's own
flag declarations (its defaults, types and bounds)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lomar.cli.suggest import suggest_flags
from lomar.errors import UsageError

__all__ = ["parse_flags", "settings_flags"]


class _Flags(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def parse_flags(add_arguments: Callable[[argparse.ArgumentParser], None], argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by a command's own flag declarations; a bad flag is a UsageError. A spec's key that is a
    prefix of a flag is unknown, as on the command line: ``warmup: 5`` is not ``warmup_epochs``."""
    parser = _Flags(add_help=False, allow_abbrev=False)
    add_arguments(parser)
    for flag, value in zip(argv, argv[1:]):  # a quoted 'false' in a spec is a value after a switch
        action = parser._option_string_actions.get(flag)
        if action is not None and action.nargs == 0 and not value.startswith("--"):
            raise UsageError(f"{flag[2:].replace('-', '_')}: {value!r} must be true or false, unquoted ({flag} takes "
                             f"no value)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}{suggest_flags(parser, unknown)}")
    return args


def settings_flags(settings: dict[str, Any]) -> list[str]:
    """{'window_size': 5, 'norm_pix_loss': False, 'crop_scale': (0.5, 1.0)}
    -> ['--window-size', '5', '--no-norm-pix-loss', '--crop-scale', '0.5', '1.0']."""
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):  # a multi-value flag (YAML gives a list)
            flags += [flag, *map(str, value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags
