"""What counts as a number where a setting, a size or a count is taken from Python callers; imports no torch."""

import numbers

__all__ = ["is_integer", "is_real"]


def is_integer(value) -> bool:
    """An integer, numpy's too (configs read back from files hold them); a bool is no count or size."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number, numpy's too; not a bool (a ratio or rate given as True is a mistake)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
