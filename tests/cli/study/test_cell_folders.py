"""Each cell of a study has its own run folder."""

import pytest

from lomar.cli.study.runner import check_cells
from lomar.cli.study.spec import parse_spec
from lomar.errors import UsageError


def test_labels_that_differ_only_in_punctuation_are_refused_before_they_share_a_folder():
    """'7:4' and '7/4' both became the folder window-7-4_seed0: the second cell trained nothing and its records
    were the first one's run and scores, silently. Refused before any cell trains."""
    grid = {"window": [dict(label="7:4", window_size=3, windows=2), dict(label="7/4", window_size=3, windows=1)]}
    with pytest.raises(UsageError, match=r"^grid: 'window=7:4' and 'window=7/4' would share the cell folder "
                                         r"window-7-4_seed0; give them labels"):
        check_cells(parse_spec(dict(name="x", budget="2steps", seeds=2, grid=grid, eval={"metrics": []})))
    grid["window"][1]["label"] = "7:1"
    assert [c.name for c in parse_spec(dict(name="x", budget="2steps", grid=grid, eval={"metrics": []})).cells()] == \
        ["window-7-4_seed0", "window-7-1_seed0"]



def test_labels_that_differ_only_in_case_are_refused_as_one_folder_where_case_is_ignored():
    """'A' and 'a' gave the folders method-A_seed0 and method-a_seed0: one folder on macOS's and Windows' default
    file systems, where the second cell silently took the first one's run and scores."""
    grid = {"window": [dict(label="Wide", window_size=3, windows=2), dict(label="wide", window_size=3, windows=1)]}
    with pytest.raises(UsageError, match=r"^grid: 'window=Wide' and 'window=wide' would share one cell folder on a "
                                         r"file system that ignores case \(macOS, Windows\): window-Wide_seed0 and "
                                         r"window-wide_seed0; give them labels that differ in more than case$"):
        check_cells(parse_spec(dict(name="x", budget="2steps", grid=grid, eval={"metrics": []})))
