"""YAML for the files users write (``--config``, study specs): ``yaml.safe_load``, except that a key given twice
in one mapping is an error. PyYAML keeps the last value silently, so ``batch_size: 64`` written again further
down a long config would win without a word, where YAML itself requires the keys of a mapping to be unique.

A file from elsewhere is bounded too: aliases (``*name``) share one object, so a few lines of nested aliases
("billion laughs") load in no time into a value that every message, check or copy of it walks in full (a config
whose ``seed`` was such a list hung ``lomar pretrain --config``); and PyYAML reads nesting by recursion, so a
few hundred brackets raised a RecursionError. Both are a :class:`YAMLError` here, before anything is built.

PyYAML's own errors span four lines (what it was reading, the problem, where, the line quoted); the callers show one
line, which was only the first ("while scanning for the next token") and named neither the problem nor the line. A
:class:`YAMLError` from :func:`load_yaml` is one line with both."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from yaml import YAMLError

from lomar.errors import UsageError

__all__ = ["YAMLError", "load_yaml", "inline", "read_settings", "read_settings_file", "MAX_VALUES", "MAX_BYTES"]

# Values (scalars, lists, mappings) a file may hold once its aliases are expanded: a config holds about a hundred,
# a large study spec a few thousand.
MAX_VALUES = 100_000
# A file's size: a config is a few KiB, a large study spec some 100; a COCO annotation file given by mistake is
# hundreds of MiB, which PyYAML reads at about 20 s a MiB (2 busy CPU cores) before any value can be refused.
MAX_BYTES = 1 << 20

_TIMESTAMP, _INT = "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:int"
# YAML 1.1's integers but base 60, so that a string yaml.safe_dump (1.1) wrote plain, as `out: 09`, reads back as text
_INT_12 = re.compile(r"^[-+]?(?:0b[01_]+|0x[0-9a-fA-F_]+|0[0-7_]*|[1-9][0-9_]*)$")
_MERGE = "tag:yaml.org,2002:merge"  # `<<: *base` then a key of base: an override YAML allows, not a duplicate


class DuplicateKeyError(YAMLError):
    """A mapping names a key twice; its message is one line naming the key and both lines."""


class _UniqueKeyLoader(yaml.SafeLoader):
    # A date is text: no setting takes one, and YAML 1.1 read `out: 2024-12-06`, a folder's name, as a datetime.date.
    # Integers are decimal as in YAML 1.2: 1.1 read `seed: 010` as 8 (octal) and `seed: 1:30` as 90 (base 60).
    yaml_implicit_resolvers = {first: [(tag, _INT_12 if tag == _INT else pattern) for tag, pattern in resolvers
                                       if tag != _TIMESTAMP]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_yaml_int(self, node):  # 1_000 as YAML 1.1 wrote it; 010 is ten
        text = self.construct_scalar(node).replace("_", "")
        return int(text, 0) if text.lstrip("+-")[:2] in ("0x", "0b") else int(text, 10)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(f"{key} is given twice (lines {seen[key]} and {line}); keep one")
                    seen[key] = line
                except TypeError:  # an unhashable key: the base constructor says so
                    continue
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(_INT, _UniqueKeyLoader.construct_yaml_int)


def read_settings_file(path: Path, what: str) -> bytes:
    """The bytes of the settings file ``path`` (``what``: 'config file'), refused past :data:`MAX_BYTES`
    (:class:`~lomar.errors.UsageError`): a file unread, a pipe (``--config <(...)``) at that many bytes."""
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        data = file.read(MAX_BYTES + 1) if size <= MAX_BYTES else b""
    if size > MAX_BYTES or len(data) > MAX_BYTES:
        raise UsageError(f"{what} {path} is {f'{size / 2**20:.1f} MiB' if size else 'more than 1 MiB'}, which no "
                         f"settings file is (at most {MAX_BYTES >> 20} MiB; a config is a few KiB); is it the file "
                         f"meant?")
    return data


def read_settings(path: Path, what: str, fix: str = "give one", error: type[UsageError] = UsageError) -> Any:
    """The YAML of the settings file ``path`` (``what``: 'config file', 'study spec'), a file or a pipe (``--config
    <(sed s/64/128/ base.yaml)``), read as :func:`read_settings_file` and :func:`load_yaml` read it; ``error`` (a
    :class:`~lomar.errors.UsageError`) where it is neither a file nor a pipe (``fix``: what to pass instead) or
    no YAML."""
    if not (path.is_file() or path.is_fifo()):
        raise error(f"{what} {path} {'is not a file' if path.exists() else 'does not exist'}; {fix}")
    try:
        return load_yaml(read_settings_file(path, what))
    except YAMLError as exc:  # a binary file, or text in another encoding, too
        raise error(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def inline(value: Any) -> str:
    """``value`` as a settings file writes it on one line: ``true``, ``auto``, ``[0.9, 0.95]`` (a tuple as a list)."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).removesuffix("\n...\n").strip()


def _expanded_values(root: yaml.Node) -> int:
    """The values under ``root`` with every alias expanded, counted without expanding any: each node once, as
    1 + its children's counts (a node an alias reaches from inside itself, a recursive value, counts 1)."""
    counts: dict[int, int] = {}
    stack, open_nodes = [(root, False)], set()
    while stack:
        node, children_done = stack.pop()
        children = [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        if children_done:
            counts[id(node)] = min(1 + sum(counts.get(id(child), 1) for child in children), MAX_VALUES + 1)
            open_nodes.discard(id(node))
        elif id(node) not in counts and id(node) not in open_nodes:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children)
    return counts[id(root)]


def _one_line(exc: YAMLError) -> str:
    """'while scanning for the next token: found character '\\t' that cannot start any token (line 1, column 12);
    indent with spaces, YAML takes no tabs'."""
    if isinstance(exc, yaml.reader.ReaderError) and exc.encoding != "unicode":  # bytes that are no UTF-8 text
        return f"it is not {exc.encoding.upper()} text ({exc.reason} at byte {exc.position + 1}); save it as UTF-8"
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: its offset in the text
        return f"{str(exc).splitlines()[0]} (character {exc.position + 1})"
    mark = exc.problem_mark or exc.context_mark
    text = ": ".join(part for part in (exc.context, exc.problem) if part) or "unreadable"
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    tab = "; indent with spaces, YAML takes no tabs" if "'\\t'" in text else ""
    return text + where + tab


def _unread_encoding(data: bytes) -> str | None:
    """'UTF-32' or 'UTF-16 (no byte-order mark)' where ``data`` starts as YAML 1.2 (5.2) tells those by their NULs,
    which PyYAML takes for control characters ('unacceptable character #x0000'); else None. No YAML text in an
    encoding PyYAML reads starts so: a NUL is refused there."""
    head = data[:4].ljust(4, b"\1")
    if head.startswith((b"\0\0\0", b"\0\0\xfe\xff", b"\xff\xfe\0\0")) or head.endswith(b"\0\0\0"):
        return "UTF-32"
    return "UTF-16 (no byte-order mark)" if b"\0" in head[:2] else None


def load_yaml(text: str | bytes) -> Any:
    """``yaml.safe_load(text)`` (bytes: UTF-8, or UTF-16 by its BOM, as YAML is written), refusing a mapping that
    repeats a key (:class:`DuplicateKeyError`), nesting deeper than PyYAML's recursion reaches, and more than
    :data:`MAX_VALUES` values once aliases are expanded; every :class:`YAMLError` is one line naming the problem and
    where it is."""
    if isinstance(text, bytes) and (unread := _unread_encoding(text)):
        raise YAMLError(f"it is {unread} text, which PyYAML does not read; save it as UTF-8")
    try:
        loader = _UniqueKeyLoader(text)  # reads the text through: a control character is refused here
    except yaml.reader.ReaderError as exc:
        raise YAMLError(_one_line(exc)) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_values(node) > MAX_VALUES:
            raise YAMLError(f"it holds more than {MAX_VALUES:,} values once its aliases (*name) are expanded; "
                            f"write the values out, or share fewer nested aliases")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        raise YAMLError(_one_line(exc)) from None
    except RecursionError:
        raise YAMLError("it nests lists or mappings too deep to read (hundreds of levels); "
                        "write the settings flat") from None
    finally:
        loader.dispose()
