"""Pretraining methods: one module each (``lomar.py``, ``mae.py``, ``beit.py``), found by name.

A method module defines ``METHOD``, a :class:`lomar.methods.base.Method`: its defaults, checks,
the explicit preparation step (BEiT's tokenizer), the model it builds, the per-sample masking
drawn in the data workers, the batch → forward arguments, its export and figure, what a
resumed run reads again (BEiT's tokenizer, where a moved run folder now keeps it), and what its
checkpoints keep to check a resume against (BEiT's tokenizer digest). Adding a method is one
module here plus its model in :mod:`lomar.models`; nothing else lists methods.

This package's ``__init__`` imports no torch, so ``--method`` choices cost nothing in ``--help``.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path

__all__ = ["names", "get_method", "variant_name"]

_NOT_METHODS = {"base"}


@cache
def names() -> tuple[str, ...]:
    """Every method's name: the modules of this package (read from the folder, not imported)."""
    found = {m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])} - _NOT_METHODS
    order = ("lomar", "mae", "beit")  # the paper's, then any others alphabetically
    return tuple(sorted(found, key=lambda n: (order.index(n) if n in order else len(order), n)))


def get_method(name: str):
    """The :class:`~lomar.methods.base.Method` called ``name``; ValueError naming the choices."""
    if name not in names():
        raise ValueError(f"--method {name!r} is unknown; choose one of {', '.join(names())}")
    return importlib.import_module(f"lomar.methods.{name}").METHOD


def variant_name(method: str, windows: int) -> str:
    """The name a run or bench record reports: lomar | lomar_global | mae | mae_window | beit | beit_window."""
    if method == "lomar":
        return "lomar" if windows else "lomar_global"
    return f"{method}_window" if windows else method
