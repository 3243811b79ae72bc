"""What a Task being built may know of the checkpoint its run resumes from.

The lifecycle reads that checkpoint before it builds the Task (:func:`lomar.train.task.preload`) and calls the Task's
``load`` on it once the whole run is built. A Task whose ``load`` refuses a checkpoint for what its data holds (other
classes or categories: finetune, detect) reads :func:`resumed_state` in its ``__init__`` to refuse as soon as it has
read them, before what costs most: the model's build, the pretrained weights' read, the images' check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["building", "resumed_state"]

_RESUMED: ContextVar[dict | None] = ContextVar("lomar_resumed", default=None)


@contextlib.contextmanager
def building(resumed: dict | None) -> Iterator[None]:
    """Within: ``resumed`` (the checkpoint the run resumes from, None for a new run) is :func:`resumed_state`."""
    token = _RESUMED.set(resumed)
    try:
        yield
    finally:
        _RESUMED.reset(token)


def resumed_state() -> dict | None:
    """While the lifecycle builds a Task: the checkpoint (a dict) its run resumes from; None for a new run, or one
    resumed from a sharded folder, which loads into the built model only."""
    return _RESUMED.get()
