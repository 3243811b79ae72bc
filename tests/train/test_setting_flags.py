"""The flags built from settings' declarations (lomar.train.setting_flags): a value outside a declaration's bounds is
refused by argparse in the words of the rule it breaks."""

from __future__ import annotations

import argparse

import pytest

from lomar.train.setting_flags import add_settings
from lomar.train.settings import Setting


@pytest.mark.parametrize("setting, given, said", [
    (Setting(0.0, "a fraction", low=0, high=1), "1.5",
     "argument --x: expected a probability in [0, 1], got 1.5 (--x must be a probability in [0, 1])"),
    (Setting(1.0, "a range", low=0.5, high=2), "3",
     "argument --x: expected a finite number in [0.5, 2], got 3 (--x must be in [0.5, 2])"),
    (Setting(1, "a count", above=0), "0", "argument --x: expected an integer >= 1, got 0 (--x must be >= 1)"),
    (Setting(1.0, "a scale", above=0), "inf",
     "argument --x: expected a finite number, got inf (--x must be a finite number)"),
])
def test_a_value_out_of_bounds_is_refused_naming_its_rule(setting, given, said, capsys):
    parser = argparse.ArgumentParser(prog="lomar test")
    add_settings(parser, {"x": setting})
    with pytest.raises(SystemExit):
        parser.parse_args(["--x", given])
    assert capsys.readouterr().err.splitlines()[-1] == f"lomar test: error: {said}"
