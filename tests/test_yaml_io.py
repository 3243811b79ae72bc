import re

import pytest
import yaml

from lomar.yaml_io import YAMLError, load_yaml


@pytest.mark.parametrize("text, key", [
    ("a: 1\nb: 2\na: 3\n", "a"), ("{a: 1, a: 2}", "a"), ("x:\n  y: 1\n  y: 2\n", "y")])
def test_a_key_given_twice_is_an_error_not_the_last_value(text, key):
    with pytest.raises(YAMLError, match=f"^{key} is given twice"):
        load_yaml(text)


def test_a_merged_mapping_may_be_overridden():
    assert load_yaml("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 5\n")["c"] == {"x": 5, "y": 2}
    assert load_yaml("") is None and load_yaml("- a\n") == ["a"]


def _laughs(levels: int) -> str:
    """Nested aliases: ten of the level below at each level, 10**levels values once expanded, in a few lines."""
    text = "seed:\n  - &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    return text + "".join(f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, levels + 1))


def test_nested_aliases_that_expand_past_the_bound_are_refused_before_anything_is_built():
    with pytest.raises(YAMLError, match="more than 100,000 values once its aliases"):
        load_yaml(_laughs(8))  # 10**8 values: every walk of the loaded list took minutes
    assert len(load_yaml(_laughs(3))["seed"]) == 4  # 1,111 values: shared aliases are still YAML
    loop = load_yaml("a: &a [1, *a]\n")["a"]  # a value that holds itself is counted once, not forever
    assert loop[1] is loop


def test_nesting_past_pyyamls_recursion_is_a_yaml_error_not_a_recursion_error():
    with pytest.raises(YAMLError, match="nests lists or mappings too deep"):
        load_yaml("seed: " + "[" * 900 + "]" * 900 + "\n")  # 900: PyYAML takes frames per level


@pytest.mark.parametrize("text, message", [
    ("batch_size:\t4\n", "found character '\\t' that cannot start any token (line 1, column 12); indent with spaces"),
    ("seed: 1\n\tlr: 2\n", "(line 2, column 1); indent with spaces, YAML takes no tabs"),
    ("? [a]\n: 1\n", "while constructing a mapping: found unhashable key (line 1, column 3)"),
    ("betas: [0.9, 0.95\nseed: 1\n", "expected ',' or ']', but got ':' (line 2, column 5)"),
    ("a: 1\n---\nb: 2\n", "but found another document (line 2, column 1)"),
    ("seed: 1\x07\n", "unacceptable character #x0007: special characters are not allowed (character 8)"),
])
def test_a_yaml_error_is_one_line_naming_the_problem_and_where(text, message):
    """The callers quote an error's first line, which was PyYAML's context alone ('while scanning for the next
    token'): neither the problem (a tab) nor its line."""
    with pytest.raises(YAMLError) as raised:
        load_yaml(text)
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("encoding, named", [
    ("utf-32", "UTF-32"), ("utf-32-le", "UTF-32"), ("utf-32-be", "UTF-32"),
    ("utf-16-le", "UTF-16 (no byte-order mark)"), ("utf-16-be", "UTF-16 (no byte-order mark)")])
def test_text_in_an_encoding_pyyaml_does_not_read_is_told_to_be_saved_as_utf_8(encoding, named):
    """PyYAML reads UTF-8 and UTF-16 by its BOM; UTF-32 (PowerShell's -Encoding utf32) was 'unacceptable character
    #x0000', which named no encoding."""
    with pytest.raises(YAMLError, match=rf"^it is {re.escape(named)} text, which PyYAML does not read; save it as "
                                        r"UTF-8$"):
        load_yaml("seed: 7\n".encode(encoding))
    assert load_yaml("seed: 7\n".encode("utf-16")) == {"seed": 7}


def test_a_date_is_read_as_the_text_written():
    """No setting takes a date: `out: 2024-12-06` loaded as datetime.date, refused as 'must be a string'."""
    assert load_yaml("out: 2024-12-06\ndata: 2024-12-06 10:00:00\nseed: 3\n") == {
        "out": "2024-12-06", "data": "2024-12-06 10:00:00", "seed": 3}
    assert load_yaml("when: !!timestamp 2024-12-06\n")["when"].year == 2024  # an explicit tag still reads as one


def test_integers_are_yaml_1_2s_not_octal_or_base_60():
    """YAML 1.1 read `seed: 010` as 8 and `seed: 1:30` as 90: accepted, and another value than the one written."""
    assert load_yaml("a: 010\nb: 1:30\nc: 0x10\ne: 1_000\nf: 0b101\ng: -5\nh: 1.5\n") == {
        "a": 10, "b": "1:30", "c": 16, "e": 1000, "f": 5, "g": -5, "h": 1.5}


@pytest.mark.parametrize("text", ["09", "-08", "0_9", "0o17", "010", "1:30", "2024-12-06", "1_000", "0x1f"])
def test_a_string_yaml_safe_dump_wrote_reads_back_as_written(text):
    """config.yaml and --print-config are written by yaml.safe_dump (YAML 1.1), which quotes only what 1.1 reads
    as another type: `out: 09` is written plain, and read as the integer 9 it named the folder 9."""
    assert load_yaml(yaml.safe_dump({"out": text})) == {"out": text}
