"""What counts as a number where a setting, a size or a count is taken from Python callers, what counts as an image
size, a device or a duration, and how a count, a duration, a percentage or a command to copy reads in a message;
imports no torch."""

import math
import numbers
import re
import reprlib
import shlex
from itertools import islice

__all__ = ["is_integer", "is_real", "is_size", "as_sides", "counted", "listed", "brief", "parse_device",
           "parse_duration", "duration_text", "percent_text", "command_line"]

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


def listed(names, at_most: int) -> str:
    """The first ``at_most`` of ``names`` as a message lists them, the rest counted: 'a, b, c and 2 more'."""
    names = list(names)
    return ", ".join(names[:at_most]) + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def brief(value) -> str:
    """``repr(value)`` for a message, at most 3 levels deep, 8 items a level and 200 characters a string."""
    return _BRIEF.repr(value)


def parse_device(text: str) -> str:
    """``--device``'s value: auto, cpu, cuda or cuda:N; a ValueError naming the forms for anything else."""
    if re.fullmatch(r"mps(:\d+)?", text):  # torch's name for Apple GPUs: lomar's numerics are untested there
        raise ValueError(f"--device {text}: Apple GPUs (MPS) are not supported yet; pass --device cpu (what auto "
                         f"picks on a Mac)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N; got --device {text}")
    return text


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int | None:
    """Whole seconds of ``3600`` (seconds), ``90m``, ``1.5h``, ``2d``, ``1h30m`` (as :func:`duration_text` writes it)
    or SLURM's ``HH:MM:SS`` / ``D-HH:MM:SS``; None for ``none``. SLURM's bare number is minutes and its ``MM:SS``
    reads like ``HH:MM``: neither is taken, so that a value is never read in another unit than meant. A ValueError
    naming the value and the forms otherwise."""
    value = text.strip().lower()
    if value == "none":
        return None
    if re.fullmatch(r"\d+(?:\.\d*)?", value):
        seconds = float(value)
    elif re.fullmatch(r"(?:\d+(?:\.\d*)?[smhd])+", value):
        seconds = sum(float(number) * _UNITS[unit] for number, unit in re.findall(r"([\d.]+)([smhd])", value))
    elif match := re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)", value):
        days, hours, minutes, secs = (int(part or 0) for part in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    else:
        raise ValueError(f"{text!r} is not a duration; write seconds (5400), 90m, 1.5h, 2d, 1h30m, or HH:MM:SS / "
                         f"D-HH:MM:SS (01:30:00, 1-12:00:00)")
    if not math.isfinite(seconds):  # hundreds of digits: round() would raise
        raise ValueError(f"{text[:20]!r}... is too long a duration; write e.g. 90m, or none for no limit")
    if seconds < 1:
        raise ValueError(f"{text!r} is under a second; write a positive duration, e.g. 90m, or none for no limit")
    return round(seconds)


def duration_text(seconds: float) -> str:
    """``seconds`` as a message says a duration: 5400 -> '1h30m', 86400 -> '1d', 45 -> '45s'."""
    left, parts = round(seconds), []
    for unit, size in sorted(_UNITS.items(), key=lambda item: -item[1]):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(part for part in parts if not part.startswith("0") or len(parts) == 1)


def percent_text(value: float | None) -> str:
    """A percentage as lomar prints it, its unit the caller's: two decimals, or two significant digits below 0.1,
    where two decimals would round a small AP's 0.0487 to 0.05 and 0.004 to 0.00, a score read as none; n/a where
    undefined (None or NaN)."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.1 else f"{value:#.2g}"


def command_line(*words) -> str:
    """A command a message tells the user to run, as a shell reads it: each word (a str or a path) quoted where it
    needs it (``shlex.join``), so that a path with a space or a quote pastes as one word; flags and placeholders
    (``DIR``, ``IMAGE...``) need none and read as they are."""
    return shlex.join(str(word) for word in words)
