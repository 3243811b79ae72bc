"""The start-up warning of the dense tasks (``lomar detect``, ``lomar segment``) on the classes a validation split
scores but no training example holds: never trained on, each scores 0 in the mean of the per-class metric."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from lomar.values import listed

__all__ = ["untrained_classes"]


def untrained_classes(val_held: Iterable[int], train_held: Iterable[int], label: Callable[[int], str],
                      nouns: tuple[str, str], held: str, metric: str, fix: str, numbered: str = "") -> str | None:
    """Words on the class ids ``val_held`` holds but ``train_held`` does not, each shown by ``label`` (the first 5):
    '``N`` ``nouns`` (singular, plural) ``held`` (never trained on, each scores 0 ``metric`` in the mean)``numbered``:
    SHOWN; ``fix``'; None where there are none."""
    unseen = sorted(set(val_held) - set(train_held))
    if not unseen:
        return None
    many = f"{len(unseen)} {nouns[0] if len(unseen) == 1 else nouns[1]}"
    return (f"{many} {held} (never trained on, each scores 0 {metric} in the mean){numbered}: "
            f"{listed(map(label, unseen), 5)}; {fix}")
