"""What counts as a number where a setting, a size or a count is taken from Python callers, what counts as an image
size, and how a count reads in a message; imports no torch."""

import numbers
import reprlib
from itertools import islice

__all__ = ["is_integer", "is_real", "is_size", "as_sides", "counted", "brief"]

# A value a message quotes, cut to what a line can show: a value from a file (a checkpoint's saved settings, a
# YAML file) may be nested thousands deep (repr: a RecursionError) or hold millions of items (a repr for minutes).
class _Brief(reprlib.Repr):
    def repr_dict(self, x, level):  # in the dict's own order, as repr shows it (reprlib sorts the keys)
        if not x or level <= 0:
            return "{...}" if x else "{}"
        pieces = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}" for k, v in islice(x.items(), self.maxdict)]
        return "{" + ", ".join(pieces + ["..."] * (len(x) > self.maxdict)) + "}"


_BRIEF = _Brief()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict, _BRIEF.maxset = 3, 8, 8, 8, 8
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 200, 200, 60


def is_integer(value) -> bool:
    """An integer, numpy's too (configs read back from files hold them); a bool is no count or size."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number, numpy's too; not a bool (a ratio or rate given as True is a mistake)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_size(value) -> bool:
    """An image or grid size as a ViTConfig takes one: an integer (a square) or a (height, width) tuple or list of
    integers, numpy's too; the sides' bounds are the caller's to check."""
    if isinstance(value, (tuple, list)):
        return len(value) == 2 and all(is_integer(v) for v in value)
    return is_integer(value)


def as_sides(size, name: str = "img_size") -> tuple[int, int]:
    """``size`` (see :func:`is_size`) as its (height, width): n is (n, n). ValueError naming ``name`` and the value
    for anything else (a bool, a float, a string, one side or three)."""
    if not is_size(size):
        raise ValueError(f"{name} must be an integer or a (height, width) pair of integers, got {brief(size)}; pass "
                         f"e.g. 224 or (224, 320)")
    height, width = size if isinstance(size, (tuple, list)) else (size, size)
    return int(height), int(width)


def counted(n: int, noun: str) -> str:
    """``n`` and the singular ``noun`` as a message says them: '1 step', '3 steps', '0 pictures'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def brief(value) -> str:
    """``repr(value)`` for a message, at most 3 levels deep, 8 items a level and 200 characters a string."""
    return _BRIEF.repr(value)
