import pytest

from lomar.yaml_io import YAMLError, load_yaml


@pytest.mark.parametrize("text, key", [
    ("a: 1\nb: 2\na: 3\n", "a"), ("{a: 1, a: 2}", "a"), ("x:\n  y: 1\n  y: 2\n", "y")])
def test_a_key_given_twice_is_an_error_not_the_last_value(text, key):
    with pytest.raises(YAMLError, match=f"^{key} is given twice"):
        load_yaml(text)


def test_a_merged_mapping_may_be_overridden():
    assert load_yaml("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 5\n")["c"] == {"x": 5, "y": 2}
    assert load_yaml("") is None and load_yaml("- a\n") == ["a"]
