"""What counts as a number where a setting, a size or a count is taken from Python callers, and how a count reads
in a message; imports no torch."""

import numbers

__all__ = ["is_integer", "is_real", "counted"]


def is_integer(value) -> bool:
    """An integer, numpy's too (configs read back from files hold them); a bool is no count or size."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number, numpy's too; not a bool (a ratio or rate given as True is a mistake)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def counted(n: int, noun: str) -> str:
    """``n`` and the singular ``noun`` as a message says them: '1 step', '3 steps', '0 pictures'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
