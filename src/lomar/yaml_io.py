"""YAML for the files users write (``--config``, study specs): ``yaml.safe_load``, except that a key given twice
in one mapping is an error. PyYAML keeps the last value silently, so ``batch_size: 64`` written again further
down a long config would win without a word, where YAML itself requires the keys of a mapping to be unique."""

from __future__ import annotations

from typing import Any

import yaml
from yaml import YAMLError

__all__ = ["YAMLError", "load_yaml"]

_MERGE = "tag:yaml.org,2002:merge"  # `<<: *base` then a key of base: an override YAML allows, not a duplicate


class DuplicateKeyError(YAMLError):
    """A mapping names a key twice; its message is one line naming the key and both lines."""


class _UniqueKeyLoader(yaml.SafeLoader):
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


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing a mapping that repeats a key (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
