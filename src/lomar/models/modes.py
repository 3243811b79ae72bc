"""A module switched to eval mode for a block and given back the mode it had, however the block ends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode inside the block; when the block ends, by an exception too, each of its modules is back
    in the mode it had: an evaluation in the middle of a run that raises (one the caller catches, a preemption's
    unwinding, a test) must not leave the model training without dropout or batch statistics, and a submodule the
    caller keeps in eval mode inside a training model (a frozen BatchNorm, a frozen tokenizer) stays so, where
    ``model.train(was_training)`` would give it the top module's mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
