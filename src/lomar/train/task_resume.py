"""What a Task being built may know of the checkpoint its run resumes from.

The lifecycle reads that checkpoint before it builds the Task (:func:`lomar.train.divergence.preload`) and calls the
Task's ``load`` on it once the whole run is built. A Task whose ``load`` refuses a checkpoint for what its data holds
(other classes or categories: finetune, detect) calls :func:`load_resumed` in its ``__init__`` to refuse as soon as it
has read them, before what costs most: the model's build, the pretrained weights' read, the images' check; the
lifecycle then does not call that ``load`` again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["Building", "building", "load_resumed"]


@dataclasses.dataclass
class Building:
    """The build of a Task: ``resumed`` (the checkpoint the run resumes from, a dict; None for a new run, or one
    resumed from a sharded folder, which loads into the built model only), and whether the Task's ``load`` ran on
    it (``loaded``)."""

    resumed: dict | None
    loaded: bool = False


_BUILDING: ContextVar[Building | None] = ContextVar("lomar_building", default=None)


@contextlib.contextmanager
def building(resumed: dict | None) -> Iterator[Building]:
    """Within: a Task built may :func:`load_resumed` ``resumed``; the :class:`Building` says whether it did."""
    build = Building(resumed)
    token = _BUILDING.set(build)
    try:
        yield build
    finally:
        _BUILDING.reset(token)


def load_resumed(task) -> None:
    """In a Task's ``__init__``, once it holds what its ``load`` checks: ``task.load`` of the checkpoint its run
    resumes from, now (nothing for a new run). The lifecycle then leaves it out of the run's load: the Task's
    state it checks is set, and the checkpoint is the same dict."""
    build = _BUILDING.get()
    if build is not None and build.resumed is not None:
        task.load(build.resumed)
        build.loaded = True
