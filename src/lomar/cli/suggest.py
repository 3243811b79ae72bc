"""A suggestion ("did you mean --workers?") for a flag a command does not have; argparse-only (no torch).

Prefixes of flags are not accepted (the parsers set ``allow_abbrev=False``): ``lomar study --seed 3`` would
have run 3 seeds (``--seeds``), and ``--warmup 5`` meant epochs in ``pretrain`` but steps in ``detect``. What a
user types instead, a prefix, another tool's spelling or a typo, gets one suggestion from the command's own flags;
another training command's flag is named as that command's.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Callable

from lomar.train.setting_names import did_you_mean, flag_of, other_commands

__all__ = ["suggest_flags", "command_parser", "command_action", "command_flags", "expanded_by_shell",
           "split_at_spaces", "operand_list", "split_operand"]


def _own_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for flag in parser._option_string_actions if flag.startswith("--") and flag != "--help"]


def suggest_flags(parser: argparse.ArgumentParser, unknown: list[str],
                  every: Callable[[], argparse.ArgumentParser] | None = None) -> str:
    """'; --num-classes is a flag of lomar segment, not of lomar pretrain' for the flags among ``unknown`` another
    command takes (as a settings file's key of another command is said), then '; did you mean --workers?' (or
    '; did you mean --workers for --num-workers; --epochs for --epoch?') for the others that resemble ``parser``'s
    flags; '' when neither. ``every``: the ``lomar`` parser with every command's flags (:func:`command_flags`),
    built only for a flag ``parser`` lacks; None: the training commands' own settings are looked in."""
    given, own = [token for token in unknown if token.startswith("-") and len(token) > 1], _own_flags(parser)
    flags = {token: flag_of(token) for token in given}
    command = parser.prog.removeprefix("lomar ") if parser.prog.startswith("lomar ") else None  # a study's: none
    # --rel_pos in segment, which has --rel-pos, is a spelling of its own flag: only the suggestion names it
    missing = {flag: flag[2:].replace("-", "_") for flag in flags.values() if flag not in own}
    table = command_flags(every()) if every is not None and command and missing else None
    for flag, name in list(missing.items()) if table else ():  # --no-mixup, which no command has: finetune's --mixup
        base, named = name.removeprefix("no_"), set().union(*table.values())
        if base != name and name not in named and base in named and f"--{base.replace('_', '-')}" not in own:
            del missing[flag]
            missing[f"--{base.replace('_', '-')}"] = base
    theirs, elsewhere = other_commands(missing, command, own, kind="flag", table=table) if command else ("", [])
    return theirs + did_you_mean([token for token in given if flags[token] not in elsewhere], own)


def command_flags(parser: argparse.ArgumentParser) -> dict[str, frozenset[str]]:
    """Each command's flags under ``parser`` (``lomar``'s), by its name ('knn', 'tokenizer fit'), as setting names
    (``--no-eval-only``: ``no_eval_only``), in the order of ``lomar --help``."""
    found, stack = {}, [parser]
    while stack:
        current = stack.pop(0)
        if current is not parser:
            found[current.prog.removeprefix("lomar ")] = frozenset(
                flag[2:].replace("-", "_") for flag in _own_flags(current))
        stack += [sub for action in current._actions if isinstance(action, argparse._SubParsersAction)
                  for sub in action.choices.values()]
    return found


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command ``args`` ran (``lomar tokenizer fit``'s, not ``lomar tokenizer``'s); ``parser``
    when none ran."""
    command = getattr(args, "command", None)
    found = parser.commands.get(command, parser) if command else parser
    nested = command_action(args)
    for action in found._actions if nested else ():
        if isinstance(action, argparse._SubParsersAction) and nested in action.choices:
            return action.choices[nested]
    return found


def command_action(args: argparse.Namespace) -> str | None:
    """The action ``args`` ran of a command that has them (``fit`` of ``lomar tokenizer fit``: its subparsers' dest is
    CMD_command), else None."""
    command = getattr(args, "command", None)
    nested = getattr(args, f"{command.replace('-', '_')}_command", None) if command else None
    return nested if isinstance(nested, str) else None


def expanded_by_shell(argv: list[str], unknown: list[str], shards: bool) -> str:
    """What to do when the first operand argparse left over follows a flag's value and that value and the operands
    after it all name existing files or folders, as an unquoted glob or brace pattern becomes (`--data
    shards/*.tar`): quote it, where they are tar shards given to --data of a command that reads shard patterns
    (``shards``: pretrain's), which lomar expands itself; else give one path. '' otherwise."""
    operands = [token for token in unknown if not token.startswith("-")]  # each one of argv's tokens
    if not operands:
        return ""
    # the first leftover follows a flag and its one value, at a place in argv where those all name paths: the one
    # followed by every leftover operand, else the first. The same path given before as another flag's value (`--out
    # s1.tar --data s0.tar s1.tar`) or as an operand right after one (`--json r.json d1 --data d0 d1`) is not it.
    # A pattern names each path once: a path typed twice (`--resume r/last.pt r/last.pt`) is no expansion
    places = []
    for at, token in enumerate(argv):
        if token != operands[0] or at < 2 or not argv[at - 2].startswith("--") or "=" in argv[at - 2] \
                or argv[at - 1].startswith("-"):
            continue
        end = next((i for i in range(at, len(argv)) if argv[i].startswith("-")), len(argv))
        paths = argv[at - 1:end]
        if len(set(paths)) == len(paths) and all(os.path.lexists(path) for path in paths):
            places.append((argv[at:end] != operands, at, end))
    if not places:
        return ""
    _, at, end = min(places)
    return _one_path_each(argv[at - 2], argv[at - 1:end], shards)


def split_at_spaces(argv: list[str], unknown: list[str], parser: argparse.ArgumentParser,
                    starting: bool = False) -> str:
    """The quoted flag when the first operand argparse left over continues a flag's value into a path that exists
    or operand into a path that exists only with the spaces between them, as an unquoted path with spaces becomes
    (`--pretrained exports/my vit`: the flag took 'exports/my', 'vit' was left over). '' otherwise. ``parser``:
    the command's, which tells a flag that takes a value from one that takes none (``--overwrite``). ``starting``:
    the operand may begin the path too (`lomar predict CKPT new photos`: a list of operands took both words)."""
    operands = [token for token in unknown if not token.startswith("-")]
    if not operands:
        return ""
    for at, token in enumerate(argv):
        if token != operands[0] or at < 1:
            continue
        before, starts = argv[at - 1], [("", [])] if starting else []
        if before.startswith("--") and "=" in before:  # --data=My Photos
            starts.insert(0, (before.split("=", 1)[0], [before.split("=", 1)[1]]))
        elif not before.startswith("-"):  # a flag's value, or an operand (`lomar knn exports/my vit`)
            action = parser._option_string_actions.get(argv[at - 2]) if at >= 2 else None
            starts.insert(0, (argv[at - 2] if action is not None and action.nargs != 0 else "", [before]))
        end = next((i for i in range(at, len(argv)) if argv[i].startswith("-")), len(argv))
        for flag, first in starts:
            for stop in range(end, at + 1 - len(first), -1):  # the longest run of words that names a path
                if os.path.lexists(joined := " ".join([*first, *argv[at:stop]])):
                    return (f"; quote a path with spaces, which the shell splits at them: "
                            f"{flag + ' ' if flag else ''}{shlex.quote(joined)}")
    return ""


def operand_list(parser: argparse.ArgumentParser) -> argparse.Action | None:
    """The command's one list of operands (predict's IMAGES), None where it has none or several."""
    lists = [a for a in parser._actions if not a.option_strings and a.nargs in ("*", "+")]
    return lists[0] if len(lists) == 1 else None


def split_operand(argv: list[str], parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """'vit does not exist; quote a path with spaces ...: 'exports/my vit 448'' for the first of the command's
    operands that names nothing and, with its neighbours, a path with spaces the shell split; '' otherwise. A list of
    operands (predict's IMAGES) takes every word, and an optional one (knn's PRETRAINED) the word after a split flag
    value, so argparse leaves none over for the unknown-argument line's hint."""
    given: list[str] = []
    for action in parser._actions:
        if not action.option_strings and action.nargs in ("?", "*", "+"):
            value = getattr(args, action.dest, None)
            given += value if isinstance(value, list) else [value] if isinstance(value, str) else []
    missing = [path for path in given if not os.path.lexists(path)]
    hint = split_at_spaces(argv, missing, parser, starting=True) if missing else ""
    return f"{missing[0]} does not exist{hint}" if hint else ""


def _one_path_each(flag: str, paths: list[str], shards: bool) -> str:
    """The fix for ``paths`` given to ``flag``, which takes one: quote a shard pattern --data reads, else give one."""
    said = f"; {flag} takes one value and the shell gave it {len(paths)} paths (an unquoted pattern)"
    if not (shards and flag == "--data" and _all_shards(paths)):
        return f"{said}: give one"
    folders, suffixes = {os.path.dirname(p) for p in paths}, {p[p.lower().rindex(".t"):] for p in paths}
    pattern = os.path.join(folders.pop(), "*") + suffixes.pop() if len(folders) == len(suffixes) == 1 else "PATTERN"
    return f"{said}: quote it, lomar expands tar shard patterns itself ({flag} '{pattern}')"


def _all_shards(paths: list[str]) -> bool:
    """Whether lomar reads every one of ``paths`` as a tar shard (any case: 'S0.TAR'; '.tar.zst' too)."""
    from lomar.data.shards import is_shard_pattern  # torch: on this error's path only, never for --help

    return all(is_shard_pattern(path) for path in paths)
