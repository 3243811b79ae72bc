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
