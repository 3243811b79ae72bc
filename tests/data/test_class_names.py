"""Class names matched by name: a classifier's head rows onto a class folder's labels."""

import pytest

from helpers import write_images
from lomar.data.class_names import names_problem, relabel, rows_by_name
from lomar.data.folder import LabelledImageFolder


def test_rows_by_name_maps_the_same_names_in_another_order_and_nothing_else():
    assert rows_by_name(["dog", "owl", "cat"], ["cat", "dog", "owl"]) == [2, 0, 1]
    assert rows_by_name(["cat", "dog"], ["cat", "dog"]) == [0, 1]
    assert rows_by_name(["cat", "dog"], ["cat", "emu"]) is None
    assert rows_by_name(["cat", "dog", "dog"], ["cat", "dog"]) is None  # as many rows as classes, or none kept


def test_relabel_gives_each_image_the_row_of_its_class_name(tmp_path):
    for name, count in (("cat", 1), ("dog", 2), ("owl", 3)):
        write_images(tmp_path / name, count, size=(8, 8))
    folder = LabelledImageFolder(tmp_path)
    by_path = {path: folder.classes[label] for path, label in folder.samples}
    relabel(folder, ["owl", "cat", "dog"], 3, "best.pt")
    assert folder.classes == ["owl", "cat", "dog"] and folder.class_to_idx == {"owl": 0, "cat": 1, "dog": 2}
    assert {path: folder.classes[label] for path, label in folder.samples} == by_path
    relabel(folder, None, 3, "best.pt")  # saved without names: as many classes, the folder's order kept
    assert folder.classes == ["owl", "cat", "dog"]
    with pytest.raises(ValueError, match=r"the classifier in best.pt has 2 classes, .* 3 class folders"):
        relabel(folder, None, 2, "best.pt")
    with pytest.raises(ValueError, match=r"only in the classifier: \['emu'\], only in .*: \['owl'\]\); score it"):
        relabel(folder, ["cat", "dog", "emu"], 3, "best.pt")
    # a hand-made checkpoint's: a one-line refusal, not a TypeError (unhashable) or a string read as its letters
    for names in ([["owl"], "cat", "dog"], "owl"):
        with pytest.raises(ValueError, match=r"the classifier in best.pt: its classes must be a list of class names"):
            relabel(folder, names, 3, "best.pt")


def test_names_read_from_a_file_must_be_as_many_distinct_strings_as_rows():
    assert names_problem(["cat", "dog"], 2) is None
    assert names_problem(["cat", "dog"], 3) == "name 2 classes for a head of 3"
    assert names_problem(["cat", "cat"], 2) == "name 'cat' twice: each row is one class"
    assert names_problem(["cat", 3], 2).startswith("must be a list of class names (strings)")
    assert names_problem("cat", 3) == "must be a list of class names (strings), got 'cat'"


def test_what_a_file_names_is_quoted_on_one_short_line():
    """label_names come from an export's config.json, which anyone may write: a line break or a megabyte name (or
    list) is quoted cut short, so the refusal stays one line."""
    assert names_problem("cat\ndog", 2) == "must be a list of class names (strings), got 'cat\\ndog'"
    for problem in (names_problem(["x" * 10**6] * 2, 2), names_problem([[[[["deep"]]]], *range(10**5)], 2)):
        assert len(problem) < 300 and "\n" not in problem
