"""Class names: how two lists of them differ, said in a message, and the one rule that matches a classifier's head
rows to a class folder's classes by name (labels are indices, so the same names in another order would swap them)."""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

from lomar.values import brief

__all__ = ["classes_only_in", "unicode_forms_note", "rows_by_name", "relabel", "names_problem"]


def classes_only_in(first: list[str], second: list[str]) -> tuple[list[str] | str, list[str] | str]:
    """(the class names only ``first`` holds, those only ``second`` holds), each sorted or "none": what a message
    names when two class lists differ (labels are indices, so a renamed class swaps them)."""
    return (sorted(set(first) - set(second)) or "none", sorted(set(second) - set(first)) or "none")


def unicode_forms_note(first: list[str], second: list[str]) -> str:
    """"" or a clause for a class-difference message when some name of ``first`` is one of ``second`` written in
    another Unicode form (decomposed, as macOS writes file names: an accent after its letter, or composed): printed,
    the two look alike, and the message would name the same names on both sides."""
    composed = {unicodedata.normalize("NFC", name): name for name in second if name not in first}
    twins = [(name, composed[nfc]) for name in first if name not in second
             and (nfc := unicodedata.normalize("NFC", name)) in composed]
    if not twins:
        return ""
    (one, other), more = twins[0], len(twins) - 1
    return (f" ({ascii(one)} and {ascii(other)}{f' and {more} more' if more else ''} are one name in two Unicode "
            f"forms, decomposed as macOS writes names and composed: rename one side's folders to the other's form, "
            f"e.g. convmv -r -f utf8 -t utf8 --nfc --notest DIR)")


def rows_by_name(saved: Sequence[str], names: Sequence[str]) -> list[int] | None:
    """For each of ``names`` (a folder's classes, in its order) the index of the same name in ``saved`` (the names of
    a head's rows): a head's rows taken in this order score ``names`` in theirs. None unless both hold the same names,
    as many (a head over other classes would score each image against another class's row)."""
    if len(saved) != len(names) or set(saved) != set(names):
        return None
    row = {name: i for i, name in enumerate(saved)}
    return [row[name] for name in names]


def names_problem(names: object, count: int) -> str | None:
    """Why ``names`` (read from a file) cannot name the ``count`` rows of a head, as the end of a message about them,
    or None: they must be as many distinct strings. Values are quoted cut short (:func:`lomar.values.brief`): a file
    may hold a million names, or one a megabyte long or with a line break."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        return f"must be a list of class names (strings), got {brief(names)}"
    if twice := sorted(name for name, times in Counter(names).items() if times > 1):
        return f"name {brief(twice[0])} twice: each row is one class"
    return None if len(names) == count else f"name {len(names)} classes for a head of {count}"


def relabel(dataset, names: Sequence[str] | None, count: int | None, source: object) -> None:
    """Label each image of ``dataset`` (a :class:`lomar.data.folder.LabelledImageFolder`) by the row of its class's
    name among ``names``, as the classifier in ``source`` names its head's rows (:func:`rows_by_name`: a folder that
    sorts them otherwise is relabelled), and its ``classes`` and ``class_to_idx`` with them. Without names (``count``
    rows, saved without them): as many classes, in the folder's order. ValueError naming the classes only one side
    has (rows would score other classes), or names that cannot be the rows' (:func:`names_problem`). A folder without
    an image that the classifier does not name is left out, as a training split leaves it out."""
    if names is not None and (problem := names_problem(names, count)):
        raise ValueError(f"the classifier in {source}: its classes {problem}; pass a checkpoint `lomar finetune` wrote")
    root, names = dataset.root, list(names or [])
    if names and (gone := [name for name in dataset.empty if name not in names]):  # no class of the classifier
        dataset.drop_classes(gone)  # a class folder without an image is none (LabelledImageFolder.match_classes)
    if not names:
        if count != len(dataset.classes):
            raise ValueError(f"the classifier in {source} has {count} classes, {root} {len(dataset.classes)} class "
                             f"folders; score it on a folder of its classes")
        return
    rows = rows_by_name(names, dataset.classes)
    if rows is None:
        only = classes_only_in(names, dataset.classes)
        raise ValueError(f"the class folders of {root} differ from the classifier's in {source} (only in the "
                         f"classifier: {only[0]}, only in {root}: {only[1]}); score it on a folder of its classes"
                         f"{unicode_forms_note(names, dataset.classes)}")
    dataset.labels = np.array(rows, dtype=np.int64)[dataset.labels]
    dataset.classes, dataset.class_to_idx = names, {name: i for i, name in enumerate(names)}
