"""Typed run settings from YAML and flags, shared by every training command.

A command's settings are one dataclass. Its fields become flags (``--window-size`` for
``window_size``), a YAML file (``--config``) may set any of them, and explicit flags win
over the file. A resumed run takes its saved settings; only run-control ones may change.
A ``tuple[float, float]`` field takes that many values: ``--crop-scale 0.5 1.0`` on the
command line, ``crop_scale: [0.5, 1.0]`` in YAML (``cls.METAVARS`` names them in --help);
a ``tuple[int, ...]`` field takes any number (``--global-blocks 2 5 8 11``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "add_dataclass_arguments", "explicit_values", "coerce_all", "read_yaml",
           "resume_values"]


class ConfigError(ValueError):
    """A configuration that cannot run; the CLI turns it into a one-line error and exit code 2."""


def field_kind(cls: type, name: str) -> tuple[str, bool]:
    """('int' | 'float' | 'str' | 'bool' | 'tuple[float, float]' ..., optional) of a settings field."""
    kind = cls.__dataclass_fields__[name].type
    kind = kind if isinstance(kind, str) else kind.__name__
    return kind.split(" | ")[0], kind.endswith("| None")


_SCALARS = {"int": int, "float": float, "str": str}


def _tuple_items(base: str) -> list[str] | None:
    """The item kinds of a ``tuple[...]`` field kind ('tuple[float, float]' -> ['float', 'float']), else None."""
    if not (base.startswith("tuple[") and base.endswith("]")):
        return None
    items = [item.strip() for item in base[len("tuple["):-1].split(",")]
    if len(items) == 2 and items[1] == "..." and items[0] in _SCALARS:  # any number of values
        return items
    if len(set(items)) != 1 or items[0] not in _SCALARS:  # one scalar kind: argparse takes one type per flag
        raise TypeError(f"settings field kind {base} is not supported; use tuple[T, T] or tuple[T, ...] with T one "
                        f"of int, float, str")
    return items


class _StoreTuple(argparse.Action):
    """nargs=N values stored as a tuple, as the field holds them (and as YAML values are coerced)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, tuple(values))


def _shown(value: Any) -> str:
    """A setting as it is typed on the command line: (0.5, 1.0) -> '0.5 1.0'."""
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str],
                            choices: dict[str, tuple], nargs_optional: dict[str, str] | None = None) -> None:
    """One flag per field, plus --config and --print-config; flags not given stay absent
    from the namespace, so that "given" can be told from "default"."""
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file with any of the settings below (default: none; flags override it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    defaults = cls()
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        base, _ = field_kind(cls, field.name)
        default = getattr(defaults, field.name)
        text = helps.get(field.name, "")
        text = f"{text} (default: {_shown(default)})" if text else f"default: {_shown(default)}"
        common = dict(default=argparse.SUPPRESS, help=text.replace("%", "%%"), dest=field.name)
        if base == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            continue
        if nargs_optional and field.name in nargs_optional:  # e.g. a bare --resume means --resume auto
            common.update(nargs="?", const=nargs_optional[field.name], metavar="PATH|auto")
        items = _tuple_items(base)
        if items:
            common.update(nargs="*" if items[-1] == "..." else len(items), action=_StoreTuple)
            if field.name in getattr(cls, "METAVARS", {}):
                common["metavar"] = cls.METAVARS[field.name]
        convert = _flag_parser(getattr(cls, "PARSERS", {}).get(field.name)) or _SCALARS[items[0] if items else base]
        parser.add_argument(flag, type=convert, choices=choices.get(field.name), **common)


def _flag_parser(parse: Callable[[str], Any] | None) -> Callable[[str], Any] | None:
    """A field's own text parser (``cls.PARSERS``) as an argparse type: ValueError -> usage error."""
    if parse is None:
        return None

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def explicit_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave: the YAML file's, then the flags' on top."""
    known = {f.name for f in dataclasses.fields(cls)}
    from_yaml = read_yaml(cls, Path(args.config)) if getattr(args, "config", None) else {}
    return {**from_yaml, **{k: v for k, v in vars(args).items() if k in known}}


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    """A YAML or saved value as its field's type; YAML 1.1 reads ``1e-3`` as a string."""
    base, optional = field_kind(cls, name)
    where = f"{name}: {value!r} in {source}"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} is not allowed: {name} needs a {base} value; set one or remove the line")
    items = _tuple_items(base)
    if items:
        noun = "strings" if items[0] == "str" else "numbers"
        if items[-1] == "...":
            wrong = ConfigError(f"{where} must be a list of {noun}, e.g. {name}: [2, 5]")
            items = [items[0]] * len(value) if isinstance(value, (list, tuple)) else []
        else:
            wrong = ConfigError(f"{where} must be a list of {len(items)} {noun}"
                                f", e.g. {name}: {list(cls.__dataclass_fields__[name].default)}")
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise wrong
        try:
            return tuple(_coerce_scalar(cls, name, kind, item, where) for kind, item in zip(items, value))
        except ConfigError:
            raise wrong from None
    return _coerce_scalar(cls, name, base, value, where)


def _coerce_scalar(cls: type, name: str, base: str, value: Any, where: str) -> Any:
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where} must be a {'string' if base == 'str' else 'number'}")
    parse = getattr(cls, "PARSERS", {}).get(name)
    if parse is not None and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return parse(str(value))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if base == "str":
        return str(value)  # e.g. `out: 2024`
    if isinstance(value, str):
        try:
            return int(value) if base == "int" else float(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} is not a number; write e.g. {name}: 1e-3") from None
    if base == "float":
        return float(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{where} must be a whole number")
        return int(value)
    return value


def coerce_all(cls: type, raw: dict, source: str, strict: bool = True, command: str = "") -> dict[str, Any]:
    """Setting names normalised (``window-size`` -> ``window_size``) and values typed.

    ``strict``: unknown names are an error (a user's file); else skipped (a run saved by
    another version)."""
    known = {f.name for f in dataclasses.fields(cls)}
    bad_keys = [repr(k) for k in raw if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"setting names in {source} must be strings, got {', '.join(bad_keys)}")
    raw = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(raw) - known)
    if unknown and strict:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in {source}; "
                          f"see `lomar {command or '<command>'} --help` for the valid ones")
    return {k: _coerce(cls, k, v, source) for k, v in raw.items() if k in known}


def read_yaml(cls: type, path: Path, strict: bool = True) -> dict[str, Any]:
    """The settings of a YAML file, typed."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return coerce_all(cls, raw, str(path), strict, getattr(cls, "COMMAND", ""))


def resume_values(cls: type, saved: dict[str, Any], source: str, explicit: dict[str, Any],
                  run_control: set[str], per_invocation: dict[str, Any],
                  derived: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The saved run's settings, with the explicit run-control ones on top; any other explicit
    setting must equal the saved one (a different model or batch cannot continue the run).

    ``per_invocation``: never inherited (e.g. resume, overwrite); ``derived``: None asks for a
    default the saved run already resolved."""
    values = {**dataclasses.asdict(cls()), **saved, **per_invocation}
    for name, value in explicit.items():
        if name in run_control or value == values[name] or (value is None and name in derived):
            continue
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} {_shown(value)} differs from {_shown(values[name])} in the run being resumed "
                          f"({source}); drop {flag} to continue the run, or start a new run with another --out")
    values.update({k: v for k, v in explicit.items() if k in run_control})
    return values


SCHEDULE_STEPS_HELP = ("length of the lr schedule (warm-up + cosine) in optimizer steps; default --epochs x the steps "
                       "per epoch, except a new run given --max-steps and no --epochs: its schedule spans --max-steps, "
                       "the warm-up keeping the recipe's share (--warmup-epochs / --epochs)")


def lay_schedule_over_max_steps(values: dict[str, Any], explicit: dict[str, Any]) -> None:
    """A new run given ``--max-steps`` and no ``--epochs``: its lr schedule spans the steps that will
    run (``schedule_steps``), so a short run warms up and anneals instead of stopping inside the
    recipe's warm-up. A resumed run keeps the schedule it started with."""
    if values.get("max_steps") and "epochs" not in explicit and "schedule_steps" not in explicit:
        values["schedule_steps"] = values["max_steps"]


def resume_target(explicit: dict[str, Any], sharded_ok: bool = False) -> Path | None:
    """The checkpoint ``--resume`` names: None when not resuming, or when ``--resume auto`` finds
    no intact checkpoint in ``--out``. ``sharded_ok``: a sharded (``.dcp``) folder may be named."""
    resume = explicit.get("resume")
    if not resume:
        return None
    if resume == "auto":
        if explicit.get("out") is None:
            raise ConfigError("--resume auto needs --out RUN_FOLDER (the run to continue); or pass "
                              "--resume RUN_FOLDER/last.pt")
        from lomar.train.run_state import find_resume_checkpoint

        out = Path(explicit["out"])
        return find_resume_checkpoint(out)[0] if out.is_dir() else None
    path = Path(resume)
    if sharded_ok and path.is_dir() and (path / ".metadata").is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"--resume {path} is a folder; pass {path / 'last.pt'}, or --out {path} --resume auto")
    if not path.is_file():
        raise ConfigError(f"--resume {path} does not exist; pass a checkpoint file or 'auto'")
    return path
