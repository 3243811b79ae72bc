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

