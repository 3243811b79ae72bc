"""The command line's flags, built from the settings' declarations (:class:`~lomar.train.settings.Setting`): one flag
(or positional argument) per setting, its help with the default, and its value checked against the declaration as
argparse reads it. Imports no torch: every parser is built from here."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import Any

from lomar.train.settings import Setting, shown

__all__ = ["add_settings", "help_text", "flags_by_setting"]


class _Store(argparse.Action):
    """Several values as a tuple, as the field holds them (and as YAML values are coerced); a
    deprecated spelling of the flag still works, with a one-line note naming the new one."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        # two spellings, or two --config files (not layered): argparse would keep the later one without a word
        spelled = namespace.__dict__.setdefault("_spelled", {})
        given = f"{option_string} {values}" if self.dest == "config" else option_string
        if spelled.setdefault(self.dest, given) != given:
            parser.error(f"{spelled[self.dest]} and {given} are one setting; give it once")
        if option_string not in (None, self.option_strings[0]):
            print(f"{parser.prog}: note: {option_string} is deprecated; use {self.option_strings[0]}", file=sys.stderr)
        setattr(namespace, self.dest, tuple(values) if isinstance(values, list) else values)


def help_text(declared: Setting) -> str:
    """The help with its default (a None or off default is explained by the help itself) and an integer upper
    bound it does not state (--img-size's 8192; a probability's 1 goes without saying)."""
    text, high = declared.help, declared.high
    bound = "" if (not isinstance(high, int) or isinstance(high, bool) or high <= 1
                   or re.search(rf"(?<!\d){high}(?!\d)", text)) else f"at most {high}"
    if "default" in text.lower() or declared.default is None or declared.default is False or declared.required:
        return (text[:-1] + f"; {bound})" if text.endswith(")") else f"{text} ({bound})") if bound else text
    default = f"default: {shown(declared.default)}{'; ' + bound if bound else ''}"
    return f"{text} ({default})" if text else default


_EXPECTED = {"positive": (">= 1", "> 0"), "a finite number": ("", "")}


def _flag_type(name: str, declared: Setting, check: bool) -> Callable[[str], Any]:
    """Text -> value; ``check``: against the declaration's bounds too, argparse reporting "--k:
    expected an integer >= 1, got 0" (a training command checks them with its YAML values)."""
    def convert(text: str) -> Any:
        if declared.parse is None:
            value = declared.kind(text)  # ValueError: argparse says "invalid int value: 'x'"
        else:
            try:
                value = declared.parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        rule = declared.broken_rule(value, choices=False) if check and not isinstance(value, str) else None
        if rule:
            phrase = _EXPECTED.get(rule, (rule.replace("at most", "<="),) * 2)[declared.kind is float]
            kind = "an integer" if declared.kind is int else "a finite number"
            # a rule naming its own noun ("a probability in [0, 1]") takes no second one
            expected = phrase if phrase.startswith("a ") else f"{kind} {phrase}".rstrip()
            flag = declared.name_flag(name)
            # Both phrasings: argparse's ("--k: expected an integer >= 1") and the training commands' own
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text} ({flag} must be {phrase or rule})")
        return value

    convert.__name__ = declared.kind.__name__
    return convert


def add_settings(parser: argparse.ArgumentParser, settings: dict[str, Setting], config: bool = False,
                 group: str | None = None) -> None:
    """One flag (or positional argument) per declaration, in the help section ``group`` if given. ``config``: a training
    command whose settings a YAML file may hold: adds --config and --print-config, and a flag not given stays out of the
    namespace, so that "given" can be told from "default"."""
    parser.lomar_settings = {**getattr(parser, "lomar_settings", {}), **settings}  # read by the declaration test
    target = parser.add_argument_group(group) if group else parser
    if config:
        parser.add_argument("--config", metavar="FILE.yaml", action=_Store,
                            help="YAML file with any of the settings below (default: none; flags override it)")
        parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for name, s in settings.items():
        common: dict[str, Any] = dict(help=help_text(s).replace("%", "%%"),
                                      default=argparse.SUPPRESS if config else s.default)
        names = [s.name_flag(name), *s.aliases] if s.flag != "" else []
        if names:
            common.update(dest=name, required=s.required)
        else:
            names, common["metavar"] = [name], s.metavar
        if s.kind is bool:
            action = argparse.BooleanOptionalAction if config or s.default else "store_true"
            target.add_argument(*names, action=action, **common)
            continue
        common.update(type=_flag_type(name, s, check=not config), choices=s.takes, nargs=s.nargs, metavar=s.metavar)
        if s.const is not None:
            common["const"] = s.const
        if isinstance(s.nargs, int) or (config and s.nargs == "*") or s.aliases:
            common["action"] = _Store
        target.add_argument(*names, **common)


def flags_by_setting(config: Any) -> dict[str, str]:
    """{setting: the flag that gives it} of a command's settings ``config``, for :func:`lomar.errors.in_flags`; none
    of a run's fields without a declaration (a caller's own settings class, as the tests' toy)."""
    fields = getattr(config, "__dataclass_fields__", {})
    return {name: f.metadata["setting"].name_flag(name) for name, f in fields.items() if "setting" in f.metadata}
