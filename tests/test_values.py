"""lomar.values: what counts as an image size, the one rule ViTConfig, grid_size and the checkpoint readers share."""

import shlex
from pathlib import Path

import numpy as np
import pytest

from lomar.values import as_sides, command_line, is_size, listed, parse_device


@pytest.mark.parametrize("size, sides", [(224, (224, 224)), ((224, 320), (224, 320)), ([224, 320], (224, 320)),
                                         (np.int64(224), (224, 224)), ((np.int32(32), 64), (32, 64))])
def test_a_size_is_an_integer_or_a_pair_of_them(size, sides):
    assert is_size(size) and as_sides(size) == sides
    assert all(type(side) is int for side in as_sides(size))  # numpy's would reach config.json and fail there


@pytest.mark.parametrize("size", [True, 224.0, "224", "ab", (224,), (3, 224, 224), (224, 320.0), (True, 2), None,
                                  np.array([224, 224])])
def test_anything_else_is_refused_by_name(size):
    assert not is_size(size)
    with pytest.raises(ValueError, match=r"^input_size must be an integer or a \(height, width\) pair of integers, "
                                         r"got .+; pass e\.g\. 224 or \(224, 320\)$") as info:
        as_sides(size, "input_size")
    assert repr(size)[:8] in str(info.value)


@pytest.mark.parametrize("text, seconds", [("5400", 5400), ("90m", 5400), ("1.5h", 5400), ("01:30:00", 5400),
                                           ("2d", 172800), ("1-12:00:00", 129600), ("36:00:00", 129600),
                                           ("45s", 45), ("1h30m", 5400), ("1d12h1s", 129601), ("none", None)])
def test_a_time_limit_is_read_in_seconds_from_each_form_the_help_names(text, seconds):
    from lomar.values import parse_duration

    assert parse_duration(text) == seconds


def test_a_time_limit_reads_in_the_stop_line_as_it_is_written():
    from lomar.values import duration_text

    assert [duration_text(s) for s in (25, 60, 3600, 5400, 86400, 129601)] == ["25s", "1m", "1h", "1h30m", "1d",
                                                                              "1d12h1s"]


@pytest.mark.parametrize("text", ["10:00", "1h.5m", "5x", "-5", "0", "0.2s", "", "1:2:3"])
def test_a_time_limit_in_another_form_is_refused_naming_it_and_a_form_that_works(text):
    """SLURM's MM:SS and its bare minutes read otherwise than meant here (a bare number is seconds)."""
    from lomar.values import parse_duration

    with pytest.raises(ValueError, match=rf"^{text!r} is (not a duration|under a second).*(90m|01:30:00)"):
        parse_duration(text)


def test_each_time_limit_the_stop_line_writes_reads_back_as_written():
    """The stop line's '1h30m' is what a user copies into the next --time-limit (the README's 3h50m too)."""
    from lomar.values import duration_text, parse_duration

    assert [parse_duration(duration_text(s)) for s in (25, 5400, 13800, 129601)] == [25, 5400, 13800, 129601]


def test_a_time_limit_of_hundreds_of_digits_is_refused_in_one_line():
    from lomar.values import parse_duration

    with pytest.raises(ValueError, match=r"^'9{20}'\.\.\. is too long a duration; write e\.g\. 90m"):
        parse_duration("9" * 400)  # float: inf, which round() cannot make whole


@pytest.mark.parametrize("text", ["mps", "mps:0"])
def test_an_apple_gpu_is_refused_as_not_supported_yet_naming_the_device_that_runs(text):
    """A Mac user's first guess: told that MPS is not supported (not merely that it is not a listed form) and that
    --device cpu runs."""
    with pytest.raises(ValueError) as caught:
        parse_device(text)
    assert str(caught.value) == (f"--device {text}: Apple GPUs (MPS) are not supported yet; pass --device cpu (what "
                                 f"auto picks on a Mac)")


def test_a_command_to_copy_keeps_a_path_with_a_space_or_a_quote_one_word():
    odd = Path("my runs/it's/last.pt")
    line = command_line("lomar", "export", odd, "--to", "DIR")
    assert shlex.split(line) == ["lomar", "export", str(odd), "--to", "DIR"]  # as a shell reads it back
    assert command_line("lomar", "visualize", Path("runs/a/last.pt"), "IMAGE...") == \
        "lomar visualize runs/a/last.pt IMAGE..."  # a plain path and a placeholder as they are


def test_listed_names_the_first_few_and_counts_the_rest():
    assert listed(["a", "b", "c"], 3) == "a, b, c"
    assert listed(iter("abcde"), 3) == "a, b, c and 2 more"
    assert listed([], 3) == ""
