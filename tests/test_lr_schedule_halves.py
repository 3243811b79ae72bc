"""BEiT's whole-step warm-up (:func:`lomar.lr_schedule.lr_at_whole_steps`) of a warm-up that is no whole number of
steps (a schedule laid over ``--schedule-steps`` keeps the recipe's warm-up share): rounded half up, never to even."""

from __future__ import annotations

import pytest

from lomar.lr_schedule import lr_at, lr_at_whole_steps


@pytest.mark.parametrize("warmup, steps", [(2.5, 3), (4.5, 5), (3.5, 4), (3.49, 3)])
def test_a_fractional_warm_up_is_rounded_half_up_to_whole_steps(warmup, steps):
    lrs = [lr_at_whole_steps(s, 100, warmup, 1.0) for s in range(steps + 1)]
    assert lrs[:steps] == pytest.approx([s / (steps - 1) for s in range(steps)], abs=1e-15)  # peaks at step n - 1
    assert lrs[steps] == lr_at(steps, 100, steps, 1.0)  # then the cosine from step n, as MAE's after its warm-up
