"""A module switched to eval mode for a block and given back the mode it had, however the block ends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode inside the block, back in its own mode (``model.train(was_training)``) when the block
    ends, by an exception too: an evaluation in the middle of a run that raises (one the caller catches, a
    preemption's unwinding, a test) must not leave the model training without dropout or batch statistics."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
